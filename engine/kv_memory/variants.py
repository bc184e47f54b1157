"""Re-group a checkpoint's KV heads: MHA by repetition (exact), GQA/MQA by mean-pooling (Ainslie et al., 2023).

Any KV-head count `d` that divides the query-head count works. Every original KV head is first written as
the per-query-head K/V projection it stands for (HF's query head `h` reads KV head `h // group`), which is
the exact MHA form; groups of `n_heads / d` consecutive query heads are then mean-pooled into one new KV
head. Pooling groups of identical heads gives the head back bit for bit (the mean is taken in float64), so
going to MHA, or to the checkpoint's own head count, is lossless. Q and O projections are never touched.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.core.config import ModelConfig
from engine.model.checkpoint import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, weight_files

KV_PROJECTIONS = tuple(f"self_attn.{p}_proj.{t}" for p in "kv" for t in ("weight", "bias"))


def divisors(n: int) -> list[int]:
    """Every KV-head count a model with `n` query heads can have."""
    return [d for d in range(1, n + 1) if n % d == 0]


def variant_config(config: ModelConfig, kv_heads: int) -> ModelConfig:
    """The same model with `kv_heads` KV heads (nothing else changes)."""
    if kv_heads < 1 or config.num_attention_heads % kv_heads:
        raise ValueError(
            f"--kv-heads must divide the {config.num_attention_heads} query heads "
            f"(one of {', '.join(map(str, divisors(config.num_attention_heads)))}), got {kv_heads}"
        )
    return dataclasses.replace(config, num_key_value_heads=kv_heads)


def variant_name(config: ModelConfig) -> str:
    """MHA / MQA / GQA-n, as the paper names them."""
    kv = config.num_key_value_heads
    if kv == config.num_attention_heads:
        return f"MHA-{kv}"
    return "MQA-1" if kv == 1 else f"GQA-{kv}"


def regroup_kv(tensor: torch.Tensor, n_heads: int, n_kv: int, new_kv: int, head_dim: int) -> torch.Tensor:
    """A K or V projection (weight `[n_kv*D, hidden]` or bias `[n_kv*D]`) re-grouped to `new_kv` heads."""
    rest = tensor.shape[1:]
    per_kv = tensor.reshape(n_kv, head_dim, *rest)
    # Expand to MHA: query head h uses KV head h // group, so each KV head repeats for its group in place.
    per_query = per_kv.repeat_interleave(n_heads // n_kv, dim=0)
    groups = per_query.reshape(new_kv, n_heads // new_kv, head_dim, *rest)
    # float64 mean: a group of identical heads comes back exactly (3x/3 == x), so MHA expansion is lossless.
    pooled = groups.double().mean(dim=1).to(tensor.dtype)
    return pooled.reshape(new_kv * head_dim, *rest).contiguous()


def regroup_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor unchanged except the K/V projections (and their biases), which are re-grouped."""
    variant_config(config, kv_heads)  # validates kv_heads
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    return {
        name: regroup_kv(t, h, kv, kv_heads, d) if name.endswith(KV_PROJECTIONS) else t
        for name, t in tensors.items()
    }


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (single or sharded) in its stored dtype."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(model_dir).items():
        by_file.setdefault(path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            out |= {name: f.get_tensor(name) for name in names}
    return out


def convert_kv_heads(model_dir: str | Path, kv_heads: int, out: str | Path) -> Path:
    """Write a normal checkpoint directory whose attention has `kv_heads` KV heads."""
    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out must differ from the model directory ({model_dir})")
    config = ModelConfig.from_dir(model_dir)
    tensors = regroup_tensors(read_tensors(model_dir), config, kv_heads)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    # Keep every field of the original config.json (pad id, dtype, ...); only the KV head count changes.
    raw = json.loads((model_dir / "config.json").read_text())
    raw["num_key_value_heads"] = kv_heads
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    _copy_side_files(model_dir, out)
    return out


def _copy_side_files(model_dir: Path, out: Path) -> None:
    """Tokenizer, generation config and the like: everything that is neither weights nor config.json."""
    skip = {"config.json", SINGLE_FILE, INDEX_FILE}
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in skip and path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
            shutil.copy2(path, out / path.name)
