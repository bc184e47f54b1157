"""Checkpoint loading: every malformed directory is a CheckpointError naming the file and the field or tensor;
sharded checkpoints load; pickles are refused unread; config.json parsing across transformers 4 and 5 styles."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from engine import LLM
from engine.core.config import ModelConfig
from engine.core.errors import CheckpointError
from engine.model.checkpoint import expected_shapes, load_weights

pytest.importorskip("transformers")

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls are dominated by thread hand-off on small CPU boxes: use one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    out = tmp_path_factory.mktemp("pristine")
    return out, make_checkpoint(out, num_kv_heads=2, num_heads=4, layers=2)


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A fresh copy of a valid tiny checkpoint for the test to break."""
    return Path(shutil.copytree(pristine[0], tmp_path / "model"))


def load(model_dir: Path) -> LLM:
    return LLM(model_dir, num_blocks=4)


def load_error(model_dir: Path) -> str:
    """The message of the CheckpointError that loading `model_dir` raises (fails the test if none is raised)."""
    with pytest.raises(CheckpointError) as info:
        load(model_dir)
    return str(info.value)


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DROP:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


DROP = object()


def edit_tensors(model_dir: Path, edit) -> None:
    tensors = load_file(model_dir / WEIGHTS)
    edit(tensors)
    save_file(tensors, model_dir / WEIGHTS, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers"])
def test_missing_config_field(ckpt: Path, field: str) -> None:
    edit_config(ckpt, **{field: DROP})
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and f"'{field}'" in msg and "missing" in msg


def test_missing_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "config.json" in msg


def test_config_not_a_directory(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "does-not-exist")
    assert "does-not-exist" in msg and "config.json" in msg


def test_invalid_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,')
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "JSON" in msg


@pytest.mark.parametrize("text", ["[]", '"LlamaForCausalLM"', "null", "42"])
def test_config_json_not_an_object(ckpt: Path, text: str) -> None:
    (ckpt / "config.json").write_text(text)
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg


def test_unsupported_architecture(ckpt: Path) -> None:
    edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "GPT2LMHeadModel" in msg
    assert "LlamaForCausalLM" in msg  # says what is supported


def test_heads_not_multiple_of_kv_heads(ckpt: Path) -> None:
    edit_config(ckpt, num_attention_heads=4, num_key_value_heads=3)
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg
    assert "num_attention_heads (4)" in msg and "num_key_value_heads (3)" in msg


@pytest.mark.parametrize("value", [0, -2, "64", 64.0, True])
def test_non_positive_integer_field(ckpt: Path, value) -> None:
    edit_config(ckpt, hidden_size=value)
    msg = load_error(ckpt)
    assert "'hidden_size'" in msg and repr(value) in msg


def test_unsupported_rope_type(ckpt: Path) -> None:
    edit_config(ckpt, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    msg = load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "yarn" in msg


def test_llama3_scaling_missing_field(ckpt: Path) -> None:
    edit_config(ckpt, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0})
    msg = load_error(ckpt)
    assert "llama3" in msg and ("high_freq_factor" in msg or "original_max_position_embeddings" in msg)


# --------------------------------------------------------------------------------------------- tensors


def test_pristine_checkpoint_loads(pristine) -> None:
    """The baseline every broken copy starts from is itself fine (so each error below is caused by the edit)."""
    model_dir, hf = pristine
    llm = load(model_dir)
    ids = [1, 2, 3, 4, 5]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - want).abs().max().item() < 1e-4


def test_missing_tensor(ckpt: Path) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    edit_tensors(ckpt, lambda t: t.pop(name))
    msg = load_error(ckpt)
    assert str(ckpt / WEIGHTS) in msg and f"'{name}'" in msg and "missing" in msg


def test_missing_tensors_counted(ckpt: Path) -> None:
    def drop_layer_1(t):
        for key in [k for k in t if k.startswith("model.layers.1.")]:
            del t[key]

    edit_tensors(ckpt, drop_layer_1)
    msg = load_error(ckpt)
    assert "model.layers.1." in msg and "(and 8 more)" in msg  # 9 tensors per layer


def test_missing_lm_head_when_untied(ckpt: Path) -> None:
    edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    assert "'lm_head.weight'" in load_error(ckpt)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.0.self_attn.k_proj.weight", (64, 64)),  # as if kv heads == heads
        ("model.embed_tokens.weight", (300, 64)),
        ("model.norm.weight", (64, 1)),
    ],
)
def test_wrong_shape(ckpt: Path, name: str, shape: tuple[int, ...]) -> None:
    expected = expected_shapes(ModelConfig.from_dir(ckpt))[name]
    assert expected != shape
    edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(shape)))
    msg = load_error(ckpt)
    assert str(ckpt / WEIGHTS) in msg and f"'{name}'" in msg
    assert str(list(shape)) in msg and str(list(expected)) in msg


@pytest.mark.parametrize("keep", ["half", "minus-16-bytes", "4-bytes", "empty"])
def test_truncated_safetensors(ckpt: Path, keep: str) -> None:
    path = ckpt / WEIGHTS
    data = path.read_bytes()
    n = {"half": len(data) // 2, "minus-16-bytes": len(data) - 16, "4-bytes": 4, "empty": 0}[keep]
    path.write_bytes(data[:n])
    msg = load_error(ckpt)
    assert str(path) in msg and ("truncated" in msg or "corrupt" in msg)


@pytest.mark.parametrize("kind", ["garbage", "bad-json-header", "huge-header-length"])
def test_corrupt_safetensors_header(ckpt: Path, kind: str) -> None:
    path = ckpt / WEIGHTS
    size = path.stat().st_size
    if kind == "garbage":
        blob = bytes((i * 37 + 11) % 256 for i in range(size))
    elif kind == "bad-json-header":
        header = b'{"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]'  # no closing }
        blob = struct.pack("<Q", len(header)) + header + b"\0" * 256
    else:
        blob = struct.pack("<Q", 2**40) + b"{}"
    path.write_bytes(blob)
    msg = load_error(ckpt)
    assert str(path) in msg and ("corrupt" in msg or "truncated" in msg)


# --------------------------------------------------------------------------------------------- pickles


class _Boobytrap:
    """Unpickling this creates `marker`: proof that someone ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.pth"])
def test_only_pickle_weights_are_refused_unread(ckpt: Path, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "UNPICKLED"
    (ckpt / WEIGHTS).unlink()
    (ckpt / name).write_bytes(pickle.dumps({"model.norm.weight": _Boobytrap(marker)}))
    pickle.loads((ckpt / name).read_bytes())  # sanity: the trap does fire when unpickled ...
    assert marker.exists()
    marker.unlink()  # ... so its absence below means the loader never unpickled it
    msg = load_error(ckpt)
    assert str(ckpt) in msg and name in msg
    assert "pickle" in msg and "safetensors" in msg
    assert not marker.exists()


def test_pickle_ignored_when_safetensors_present(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Boobytrap(marker)))
    load(ckpt)
    assert not marker.exists()


def test_no_weights_at_all(ckpt: Path) -> None:
    (ckpt / WEIGHTS).unlink()
    msg = load_error(ckpt)
    assert str(ckpt) in msg and WEIGHTS in msg and INDEX in msg


# --------------------------------------------------------------------------------------------- sharded


@pytest.fixture(scope="module")
def sharded(pristine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pristine[0] / f, out / f)
    pristine[1].save_pretrained(out, max_shard_size="40KB")
    return out


def shards(model_dir: Path) -> list[str]:
    return sorted(set(json.loads((model_dir / INDEX).read_text())["weight_map"].values()))


def test_sharded_checkpoint_loads_and_matches(sharded: Path, pristine) -> None:
    assert not (sharded / WEIGHTS).exists() and len(shards(sharded)) > 2
    single = load_weights(pristine[0], ModelConfig.from_dir(pristine[0]), torch.float32)
    split = load_weights(sharded, ModelConfig.from_dir(sharded), torch.float32)
    assert single.keys() == split.keys()
    for name in single:
        assert torch.equal(single[name], split[name]), name
    ids = list(range(0, 250, 10))
    assert torch.equal(load(sharded).logits(ids), load(pristine[0]).logits(ids))


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_index_points_at_missing_shard(sharded: Path, tmp_path: Path) -> None:
    model_dir = _copy(sharded, tmp_path / "m")
    victim = shards(model_dir)[1]
    (model_dir / victim).unlink()
    msg = load_error(model_dir)
    assert str(model_dir / victim) in msg and "does not exist" in msg


def test_index_misplaces_tensor(sharded: Path, tmp_path: Path) -> None:
    model_dir = _copy(sharded, tmp_path / "m")
    index = json.loads((model_dir / INDEX).read_text())
    name = "model.norm.weight"
    wrong = next(s for s in shards(model_dir) if s != index["weight_map"][name])
    index["weight_map"][name] = wrong
    (model_dir / INDEX).write_text(json.dumps(index))
    msg = load_error(model_dir)
    assert str(model_dir / wrong) in msg and f"'{name}'" in msg


def test_index_missing_tensor_entry(sharded: Path, tmp_path: Path) -> None:
    model_dir = _copy(sharded, tmp_path / "m")
    index = json.loads((model_dir / INDEX).read_text())
    del index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    (model_dir / INDEX).write_text(json.dumps(index))
    msg = load_error(model_dir)
    assert str(model_dir / INDEX) in msg and "'model.layers.0.self_attn.q_proj.weight'" in msg


@pytest.mark.parametrize(
    "text", ["not json", '{"metadata": {}}', "[]", '{"weight_map": ["a"]}', '{"weight_map": null}',
             '{"weight_map": {"model.norm.weight": 1}}'],
)  # fmt: skip
def test_invalid_index(sharded: Path, tmp_path: Path, text: str) -> None:
    model_dir = _copy(sharded, tmp_path / "m")
    (model_dir / INDEX).write_text(text)
    msg = load_error(model_dir)
    assert str(model_dir / INDEX) in msg and "weight_map" in msg


# --------------------------------------------------------------------------------------------- config parsing

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def test_rope_transformers4_and_5_styles_agree() -> None:
    v4 = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    v4_old_key = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}})
    v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}})
    assert v4 == v4_old_key == v5
    s = v5.rope_scaling
    assert (v5.rope_theta, s.rope_type, s.factor, s.original_max_position_embeddings) == (500000.0, "llama3", 8.0, 32)
    assert (s.low_freq_factor, s.high_freq_factor) == (1.0, 4.0)


def test_linear_rope_both_styles() -> None:
    v4 = ModelConfig.from_dict({**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
    v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    assert v4 == v5 and v5.rope_scaling.rope_type == "linear" and v5.rope_scaling.factor == 2.0
    assert v5.rope_theta == 1e6


def test_default_rope_both_styles() -> None:
    v4 = ModelConfig.from_dict({**BASE, "rope_theta": 12345.0, "rope_scaling": None})
    v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}})
    assert v4 == v5 and v5.rope_theta == 12345.0 and v5.rope_scaling.rope_type == "default"
    assert ModelConfig.from_dict(BASE).rope_theta == 10000.0


def test_real_transformers_configs_parse(tmp_path: Path) -> None:
    """What transformers 5 itself writes for a llama3-scaled model round-trips through our parser."""
    from transformers import LlamaConfig

    LlamaConfig(**{k: v for k, v in BASE.items() if k != "architectures"}, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", **LLAMA3}).save_pretrained(tmp_path)  # fmt: skip
    c = ModelConfig.from_dir(tmp_path)
    assert c.rope_theta == 500000.0 and c.rope_scaling.rope_type == "llama3" and c.rope_scaling.factor == 8.0


@pytest.mark.parametrize("eos, want", [(2, (2,)), ([2, 7], (2, 7)), (None, ()), ([5], (5,))])
def test_eos_id_or_list(eos, want) -> None:
    assert ModelConfig.from_dict({**BASE, "eos_token_id": eos}).eos_token_ids == want


def test_eos_list_in_checkpoint_loads(ckpt: Path) -> None:
    edit_config(ckpt, eos_token_id=[258, 257])
    llm = load(ckpt)
    assert llm.config.eos_token_ids == (258, 257)


def test_head_dim_derived_and_explicit() -> None:
    derived = ModelConfig.from_dict(BASE)
    assert derived.head_dim == 16 and derived.num_key_value_heads == 4 and derived.group_size == 1
    explicit = ModelConfig.from_dict({**BASE, "head_dim": 24, "num_key_value_heads": 1})
    assert explicit.head_dim == 24 and explicit.group_size == 4
    assert ModelConfig.from_dict({**BASE, "head_dim": None}).head_dim == 16


def test_head_dim_not_derivable() -> None:
    with pytest.raises(CheckpointError, match=r"hidden_size \(66\).*num_attention_heads \(4\)"):
        ModelConfig.from_dict({**BASE, "hidden_size": 66})
    with pytest.raises(CheckpointError, match="head_dim must be even"):
        ModelConfig.from_dict({**BASE, "head_dim": 15})


def test_architecture_from_model_type_and_qwen2_bias_default() -> None:
    qwen = ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "architectures"} | {"model_type": "qwen2"})
    assert qwen.architecture == "Qwen2ForCausalLM" and qwen.attention_bias
    assert not ModelConfig.from_dict(BASE).attention_bias
