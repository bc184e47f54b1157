"""The `kvmini` CLI, run in-process through `engine.cli.main` (plus one real subprocess): `info` numbers against
transformers, and clean one-line errors with exit status 2 on bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import make_checkpoint
from engine.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def number_after(label: str, text: str) -> int:
    """The integer (with thousands separators) printed after `label` on its line."""
    match = re.search(re.escape(label) + r"[^\n0-9]*([0-9][0-9,]*)", text)
    assert match, f"{label!r} not found in:\n{text}"
    return int(match.group(1).replace(",", ""))


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmini: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------------------------- info


@pytest.mark.real
def test_info_smollm2(capsys, smollm2_dir: Path, smollm2_hf) -> None:
    code, out, err = run_cli(capsys, "info", smollm2_dir)
    assert code == 0 and err == ""
    hf_params = sum(p.numel() for p in smollm2_hf.parameters())  # parameters() yields the tied weight once
    assert smollm2_hf.config.tie_word_embeddings
    assert number_after("parameters:", out) == hf_params
    assert 134_000_000 < hf_params < 135_000_000  # ~134.5M
    assert number_after("KV cache per token (float32):", out) == 2 * 30 * 3 * 64 * 4 == 46080
    assert number_after("KV cache per token (bfloat16/float16):", out) == 46080 // 2
    assert "9 query heads over 3 KV heads (group size 3), head_dim 64" in out
    assert "architectures: ['LlamaForCausalLM']" in out and "num_hidden_layers: 30" in out


TINY = {
    "gqa-untied": dict(num_kv_heads=2, num_heads=4),
    "mqa-tied": dict(num_kv_heads=1, num_heads=4, tie=True),
    "head-dim-24": dict(num_kv_heads=2, num_heads=4, head_dim=24),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2, num_heads=4, layers=3),
}


@pytest.mark.parametrize("case", list(TINY))
def test_info_counts_match_hf(capsys, tmp_path: Path, case: str) -> None:
    hf = make_checkpoint(tmp_path, **TINY[case])
    code, out, _ = run_cli(capsys, "info", tmp_path)
    assert code == 0
    assert number_after("parameters:", out) == sum(p.numel() for p in hf.parameters())
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim
    assert number_after("KV cache per token (float32):", out) == kv * 4
    assert number_after("KV cache per token (bfloat16/float16):", out) == kv * 2


# --------------------------------------------------------------------------------------------- errors


def _broken(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / f"broken-{kind}"
    d.mkdir()
    good = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4,
    }  # fmt: skip
    text = {
        "no-config": None,
        "invalid-json": '{"hidden_size": ',
        "missing-field": json.dumps({k: v for k, v in good.items() if k != "hidden_size"}),
        "gpt2": json.dumps({**good, "architectures": ["GPT2LMHeadModel"]}),
        "kv-heads": json.dumps({**good, "num_key_value_heads": 3}),
        "not-an-object": "[]",
    }[kind]
    if text is not None:
        (d / "config.json").write_text(text)
    return d


BROKEN = {
    "no-config": "config.json",
    "invalid-json": "JSON",
    "missing-field": "'hidden_size'",
    "gpt2": "GPT2LMHeadModel",
    "kv-heads": "num_key_value_heads (3)",
    "not-an-object": "config.json",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_info_broken_dir(capsys, tmp_path: Path, kind: str) -> None:
    model_dir = _broken(tmp_path, kind)
    code, out, err = run_cli(capsys, "info", model_dir)
    assert_one_line_error(code, out, err, "bad checkpoint", str(model_dir), BROKEN[kind])


def test_info_missing_dir(capsys, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "info", tmp_path / "nope")
    assert_one_line_error(code, out, err, str(tmp_path / "nope"))


@pytest.mark.parametrize("content", [b"this is not a gguf file\n" * 10, b"GGUF", b""], ids=["text", "magic-only", "empty"])
def test_convert_non_gguf(capsys, tmp_path: Path, content: bytes) -> None:
    src = tmp_path / "model.gguf"
    src.write_bytes(content)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "convert", src, "--out", out_dir)
    assert_one_line_error(code, out, err, str(src))
    assert not out_dir.exists()


def test_convert_missing_file(capsys, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "convert", tmp_path / "absent.gguf", "--out", tmp_path / "out")
    assert_one_line_error(code, out, err, "absent.gguf")
    assert not (tmp_path / "out").exists()


def test_subprocess_info_broken_dir_exits_2(tmp_path: Path) -> None:
    model_dir = _broken(tmp_path, "missing-field")
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "info", str(model_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("kvmini: bad checkpoint:") and "'hidden_size'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- info validates


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A valid tiny checkpoint (untied, GQA) that the tests below copy and break."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tiny") / "model"
    make_checkpoint(out, num_kv_heads=2, num_heads=4, layers=2)
    return out


WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _edit_config(d: Path, **changes) -> None:
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, **changes}))


def _edit_tensors(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / WEIGHTS)
    edit(tensors)
    save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})


def _shard(d: Path) -> list[str]:
    """Split model.safetensors into two shards plus an index, as save_pretrained(max_shard_size=...) does."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / WEIGHTS)
    (d / WEIGHTS).unlink()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts: list[dict] = [{}, {}]
    for key, t in tensors.items():
        parts[key.startswith("model.layers.1.") or key == "lm_head.weight"][key] = t
    weight_map = {}
    for fname, part in zip(names, parts):
        save_file(part, d / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


def _edit_index(d: Path, edit) -> None:
    index = json.loads((d / INDEX).read_text())
    edit(index["weight_map"])
    (d / INDEX).write_text(json.dumps(index))


def _truncate(path: Path, drop: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - drop])


class _Boobytrap:
    """Unpickling this creates `marker`: proof that someone ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only(d: Path) -> None:
    import pickle

    (d / WEIGHTS).unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": _Boobytrap(d.parent / "UNPICKLED")}))


LAYER1_DOWN = "model.layers.1.mlp.down_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"
SHARD2 = "model-00002-of-00002.safetensors"

# kind -> (how to break a copy of the tiny checkpoint, the file the message names, fragments of the message)
INFO_BROKEN = {
    "missing-tensor": (lambda d: _edit_tensors(d, lambda t: t.pop(LAYER1_DOWN)), WEIGHTS,
                       [f"missing tensor '{LAYER1_DOWN}'"]),
    "missing-layer": (lambda d: _edit_config(d, num_hidden_layers=3), WEIGHTS,
                      ["missing tensor 'model.layers.2.", "(and 8 more)"]),
    "missing-lm-head": (lambda d: _edit_tensors(d, lambda t: t.pop("lm_head.weight")), WEIGHTS,
                        ["'lm_head.weight'"]),
    "wrong-shape": (lambda d: _edit_tensors(d, lambda t: t.__setitem__(K0, torch.zeros(64, 64))), WEIGHTS,
                    [f"tensor '{K0}' has shape [64, 64], expected [32, 64]"]),
    "wrong-shape-config": (lambda d: _edit_config(d, intermediate_size=96), WEIGHTS,
                           ["'model.layers.0.mlp.gate_proj.weight' has shape [128, 64], expected [96, 64]"]),
    "int-dtype": (lambda d: _edit_tensors(d, lambda t: t.__setitem__(K0, t[K0].to(torch.int32))), WEIGHTS,
                  [f"tensor '{K0}' has dtype I32", "floating-point"]),
    "bool-dtype": (lambda d: _edit_tensors(d, lambda t: t.__setitem__("model.norm.weight",
                                                                      t["model.norm.weight"] > 0)), WEIGHTS,
                   ["tensor 'model.norm.weight' has dtype BOOL"]),
    "truncated": (lambda d: _truncate(d / WEIGHTS, 16), WEIGHTS, ["corrupt or truncated"]),
    "truncated-to-4-bytes": (lambda d: (d / WEIGHTS).write_bytes(b"\x10\0\0\0"), WEIGHTS, ["corrupt or truncated"]),
    "missing-config-field": (lambda d: _edit_config(d, vocab_size=None), "config.json",
                             ["missing required field 'vocab_size'"]),
    "bad-config-field": (lambda d: _edit_config(d, hidden_size=0), "config.json",
                         ["'hidden_size' must be a positive integer, got 0"]),
    "bad-rope": (lambda d: _edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "config.json",
                 ["'yarn'"]),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "", ["no tokenizer.json or tokenizer.model"]),
    "corrupt-tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"model": '), "tokenizer.json",
                          ["cannot load tokenizer.json"]),
    "bad-tokenizer-config": (lambda d: (d / "tokenizer_config.json").write_text('{"chat_template": 3}'),
                             "tokenizer_config.json", ["'chat_template'"]),
    "pickle-only": (_pickle_only, "", ["pytorch_model.bin", "pickle", "safetensors"]),
    "no-weights": (lambda d: (d / WEIGHTS).unlink(), "", [WEIGHTS, INDEX]),
    "shard-missing": (lambda d: (d / _shard(d)[1]).unlink(), SHARD2, ["does not exist"]),
    "shard-truncated": (lambda d: _truncate(d / _shard(d)[1], 100), SHARD2, ["corrupt or truncated"]),
    "index-misplaces-tensor": (
        lambda d: (_shard(d), _edit_index(d, lambda m: m.__setitem__("model.norm.weight", SHARD2))), SHARD2,
        ["missing tensor 'model.norm.weight' (the index says it is in this file)"]),
    "index-drops-tensor": (lambda d: (_shard(d), _edit_index(d, lambda m: m.pop(K0))), INDEX,
                           [f"missing tensor '{K0}'"]),
    "index-not-json": (lambda d: (_shard(d), (d / INDEX).write_text("{")), INDEX, ["weight_map"]),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(INFO_BROKEN))
def test_info_refuses_what_loading_refuses(capsys, tiny_ckpt: Path, tmp_path: Path, kind: str) -> None:
    """`kvmini info` exits 2 with the one-line message `LLM(...)` (so `kvmini serve`) raises, naming the file
    and the tensor or field, and prints nothing else."""
    from engine import LLM
    from engine.core.errors import CheckpointError

    break_it, fname, fragments = INFO_BROKEN[kind]
    model_dir = Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))
    break_it(model_dir)
    code, out, err = run_cli(capsys, "info", model_dir)
    assert_one_line_error(code, out, err, "bad checkpoint", str(model_dir / fname), *fragments)
    assert out == ""
    assert not (tmp_path / "UNPICKLED").exists()  # a pickle is refused unread
    with pytest.raises(CheckpointError) as loading:
        LLM(model_dir, num_blocks=4)
    assert err.strip() == f"kvmini: bad checkpoint: {loading.value}"  # the same verdict, word for word


def test_info_ok_reads_headers_only(capsys, tiny_ckpt: Path, monkeypatch) -> None:
    """A good checkpoint passes with a 'checkpoint OK' line, without reading any tensor's data."""
    import engine.model.checkpoint

    def no_reading(*args):
        raise AssertionError("info read tensor data")

    monkeypatch.setattr(engine.model.checkpoint, "_read_file", no_reading)
    code, out, err = run_cli(capsys, "info", tiny_ckpt)
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == "checkpoint OK: 21 tensors (21 F32) in 1 safetensors file, tokenizer of 259 tokens"


@pytest.mark.parametrize("kind", ["sharded-bf16", "pickle-beside-safetensors", "extra-tensor", "tied-with-lm-head"])
def test_info_ok_variants(capsys, tiny_ckpt: Path, tmp_path: Path, kind: str) -> None:
    """What loading accepts, info accepts: shards, 16-bit storage, an ignored pickle, extra tensors."""
    from engine import LLM

    model_dir = Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))
    if kind == "sharded-bf16":
        _edit_tensors(model_dir, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
        _shard(model_dir)
    elif kind == "pickle-beside-safetensors":
        import pickle

        (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Boobytrap(tmp_path / "UNPICKLED")))
    elif kind == "extra-tensor":
        _edit_tensors(model_dir, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.scale", torch.ones(8)))
    else:
        _edit_config(model_dir, tie_word_embeddings=True)  # lm_head.weight is then an ignored copy
    code, out, err = run_cli(capsys, "info", model_dir)
    assert code == 0 and err == "", err
    last = out.splitlines()[-1]
    assert last.startswith("checkpoint OK: ") and "tokenizer of 259 tokens" in last
    if kind == "sharded-bf16":
        assert "(21 BF16) in 2 safetensors files" in last
    if kind == "extra-tensor":
        assert "ignored: 1 unexpected tensors, e.g. model.layers.0.self_attn.rotary_emb.scale" in out
    if kind == "tied-with-lm-head":
        assert "20 tensors" in last
    assert not (tmp_path / "UNPICKLED").exists()
    LLM(model_dir, num_blocks=4)  # and it does load


def test_serve_cli_reads_like_vllms(monkeypatch, capsys, tmp_path):
    """`kvmini serve MODEL` (positional, or --model), vLLM's option names, every default in --help, --version."""
    import server.cli
    from engine.cli import main
    from engine.core.paths import default_model_dir

    seen = {}
    monkeypatch.setattr(server.cli, "serve", lambda args: seen.setdefault("args", args) and 0)
    assert main(["serve", str(tmp_path), "--served-model-name", "smol", "--max-model-len", "1024",
                 "--max-waiting-requests", "7", "--log-level", "warning"]) == 0
    args = seen.pop("args")
    assert (args.model, args.served_model_name, args.max_model_len, args.max_waiting_requests, args.log_level) == (
        tmp_path, "smol", 1024, 7, "warning")
    assert main(["serve", "--model", str(tmp_path)]) == 0 and seen.pop("args").model == tmp_path
    assert main(["serve", str(tmp_path), "--kv-cache-dtype", "int8"]) == 0
    assert seen.pop("args").kv_cache_dtype == "int8"
    assert main(["serve"]) == 0 and seen.pop("args").model == default_model_dir()
    assert main(["serve", str(tmp_path), "--model", str(tmp_path / "other")]) == 2
    assert "given twice" in capsys.readouterr().err

    for argv in (["--version"], ["serve", "--version"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and capsys.readouterr().out.startswith("kvmini ")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 256M)", "(default: 8000)", "(default: 127.0.0.1)", "(default: 64)",
                    "(default: 256)", "(default: info)", "(default: bfloat16)", "(default: auto)"):
        assert default in text, default
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 0.0)" in " ".join(capsys.readouterr().out.split())  # the temperature


def test_max_model_len_out_of_range_is_refused(tmp_path):
    from engine import LLM
    from tests.checkpoints import make_checkpoint

    make_checkpoint(tmp_path, layers=1)
    for bad in (0, 513):
        with pytest.raises(ValueError, match="max_model_len"):
            LLM(tmp_path, max_model_len=bad)
    assert LLM(tmp_path, max_model_len=64).max_model_len == 64
