"""Load and validate HF-format safetensors weights (single file or sharded); refuse pickles."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.core.config import ModelConfig
from engine.core.errors import CheckpointError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors some exporters write that carry no weights we need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its HF name and shape."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        if c.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if c.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
        if c.mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (c.intermediate_size,),
                p + "mlp.up_proj.bias": (c.intermediate_size,),
                p + "mlp.down_proj.bias": (c.hidden_size,),
            }
    return shapes


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(index, f"not a valid safetensors index ({e!r}); expected a 'weight_map' object")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(index, "not a valid safetensors index: 'weight_map' must map tensor names to file names")
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if model_dir.is_dir() else []
    if pickles:
        raise CheckpointError(
            model_dir,
            f"found only pickle weights ({', '.join(pickles)}); kvmini refuses them because unpickling can run "
            "arbitrary code. Convert them to safetensors first (for example with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)).",
        )
    raise CheckpointError(model_dir, f"no {SINGLE_FILE} or {INDEX_FILE} found")


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"corrupt or truncated safetensors file: {e}") from None


# The dtypes (as a safetensors header spells them) a weight may be stored in; each is cast to the run dtype.
# An integer or bool tensor is not a weight we can cast (packed GPTQ/AWQ ints, a mislabelled buffer).
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class CheckedWeights:
    """What `check_checkpoint` found: where each expected tensor lives, its stored dtype, and what is ignored."""

    shards: dict[Path, list[str]]  # file -> the expected tensors it holds (in `expected_shapes` order)
    dtypes: dict[str, str]  # expected tensor -> its safetensors dtype ("F32", "BF16", ...)
    unexpected: list[str]  # tensors in the checkpoint that kvmini ignores

    @property
    def num_tensors(self) -> int:
        return len(self.dtypes)


def check_checkpoint(model_dir: str | Path, config: ModelConfig) -> CheckedWeights:
    """Validate the weights of `model_dir` against `config` from the safetensors headers alone: every expected
    tensor present (in the file the index names), with the expected shape and a floating-point dtype; every
    file it needs readable and not truncated. No tensor data is read. Raises CheckpointError naming the file and
    the tensor. `load_weights` runs exactly these checks before it reads anything."""
    files = weight_files(model_dir)
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        where = Path(model_dir) / (INDEX_FILE if (Path(model_dir) / INDEX_FILE).exists() else SINGLE_FILE)
        raise CheckpointError(where, f"missing tensor '{missing[0]}'{more}")
    unexpected = [n for n in files if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding): harmless.
    unexpected = [n for n in unexpected if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    shards: dict[Path, list[str]] = {}
    for name in expected:
        shards.setdefault(files[name], []).append(name)
    dtypes: dict[str, str] = {}
    for path, names in shards.items():
        dtypes |= _check_file(path, names, expected)
    return CheckedWeights(shards, {name: dtypes[name] for name in expected}, unexpected)


def _check_file(path: Path, names: list[str], expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The stored dtype of each of `names` in `path`, after checking presence, shape and dtype in its header."""
    if not path.is_file():
        raise CheckpointError(path, f"shard listed in {INDEX_FILE} does not exist")
    dtypes = {}
    try:
        with safe_open(path, framework="pt") as f:  # parses and validates the header only; data stays on disk
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(path, f"missing tensor '{name}' (the index says it is in this file)")
                info = f.get_slice(name)
                shape = tuple(info.get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        path, f"tensor '{name}' has shape {list(shape)}, expected {list(expected[name])}"
                    )
                dtype = info.get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise CheckpointError(
                        path, f"tensor '{name}' has dtype {dtype}, expected a floating-point dtype "
                        f"({', '.join(FLOAT_DTYPES)})"
                    )
                dtypes[name] = dtype
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"corrupt or truncated safetensors file: {e}") from None
    return dtypes


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Validate the checkpoint (`check_checkpoint`), then read every expected tensor and cast it to `dtype`."""
    checked = check_checkpoint(model_dir, config)
    if checked.unexpected:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(checked.unexpected), checked.unexpected[0])
    out: dict[str, torch.Tensor] = {}
    for path, names in checked.shards.items():
        out |= _read_file(path, names, dtype)
    return out


def _read_file(path: Path, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name).to(dtype) for name in names}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"corrupt or truncated safetensors file: {e}") from None
