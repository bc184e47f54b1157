"""Which slice of the model one tensor-parallel rank holds (Megatron-LM's split, as nano-vllm and vLLM do it).

    column-parallel  q/k/v (rank r: query heads r·H/N.., KV heads r·KVH/N..) and gate/up (rows r·I/N..):
                     each rank computes its own output features, nothing to add up
    row-parallel     o_proj and down_proj take the matching input columns: each rank holds a partial sum,
                     one all-reduce per layer and projection adds them (their bias is kept on rank 0 only,
                     so it is added once)
    vocabulary       the embedding and the output head keep rows r·V'/N.. (V' = V rounded up to a multiple
                     of N, the padding rows zero): the embedding is summed over ranks (one rank owns each
                     token), the head's logits are gathered on rank 0 and the padding cut off
    replicated       the norms

Sharding works on the checkpoint's HF tensors, before `build_model`, so packing and weight quantization
happen per rank on its own slice exactly as they do for a whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from engine.cache.pools import CacheConfig, KVCache
from engine.core.config import ModelConfig
from engine.model.checkpoint import load_weights
from engine.model.llama import LlamaModel, build_model

if TYPE_CHECKING:
    from engine.core.comm import TensorParallel

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")


def valid_sizes(config: ModelConfig) -> list[int]:
    """Tensor-parallel sizes this model can be split into: the divisors of its KV heads that also divide the
    MLP's intermediate size (a divisor of the KV heads divides the query heads too)."""
    g = math.gcd(config.num_key_value_heads, config.intermediate_size)
    return [n for n in range(1, g + 1) if g % n == 0]


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """N must split the KV heads, the query heads and the MLP rows evenly: a clear error otherwise."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a whole number >= 1, got {size!r}")
    for what, count in (("KV heads", config.num_key_value_heads), ("query heads", config.num_attention_heads),
                        ("intermediate size", config.intermediate_size)):
        if count % size:
            sizes = ", ".join(map(str, valid_sizes(config)))
            raise ValueError(f"tensor_parallel_size {size} does not divide the model's {count} {what}: each rank "
                             f"must hold the same number; this model can use {sizes}")


def vocab_rows(vocab_size: int, size: int) -> int:
    """Rows of the embedding and the head on each rank (the last rank's tail is zero padding)."""
    return -(-vocab_size // size)


def rank_config(config: ModelConfig, size: int) -> ModelConfig:
    """The model one rank holds: H/N query heads, KVH/N KV heads, I/N MLP rows, its vocabulary rows. Its KV
    cache is built from it, so a rank's pool holds its own heads only (1/N of the bytes)."""
    check_tensor_parallel(config, size)
    if size == 1:
        return config
    return replace(config, num_attention_heads=config.num_attention_heads // size,
                   num_key_value_heads=config.num_key_value_heads // size,
                   intermediate_size=config.intermediate_size // size,
                   vocab_size=vocab_rows(config.vocab_size, size))


def shard_weights(tensors: dict[str, torch.Tensor], config: ModelConfig, rank: int,
                  size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of every HF-named tensor (see the module docstring)."""
    if size == 1:
        return tensors
    return {name: _shard(name, t, config, rank, size) for name, t in tensors.items()}


def _shard(name: str, t: torch.Tensor, config: ModelConfig, rank: int, size: int) -> torch.Tensor:
    module, _, kind = name.rpartition(".")  # "model.layers.3.self_attn.q_proj", "weight"
    projection = module.rpartition(".")[2]
    if name in VOCABULARY:
        rows = vocab_rows(config.vocab_size, size)
        part = t[rank * rows : (rank + 1) * rows]
        padding = part.new_zeros(rows - part.shape[0], *part.shape[1:])
        return torch.cat([part, padding]) if padding.shape[0] else part
    if projection in COLUMN_PARALLEL:  # q/k/v rows are whole heads in order, so equal chunks are whole heads
        return t.chunk(size, dim=0)[rank]
    if projection in ROW_PARALLEL:
        if kind == "bias":
            return t if rank == 0 else torch.zeros_like(t)
        return t.chunk(size, dim=1)[rank]
    return t  # norms


@dataclass(frozen=True)
class RankSpec:
    """What every rank loads: decided by rank 0 and sent to the others, so that all of them agree."""

    model_dir: str
    dtype: torch.dtype
    pack_weights: bool
    quantization: str | None
    cache: CacheConfig | None  # num_blocks resolved by rank 0: every rank's pool has the same blocks; None: no pool
    batch_invariant: bool = False  # check each layer's row-invariant row count (engine/model/invariance.py)


def load_rank(spec: RankSpec, config: ModelConfig, device: torch.device,
              tp: TensorParallel | None = None) -> tuple[LlamaModel, KVCache | None]:
    """This rank's model and KV cache (the whole model's without `tp`): its slice of the checkpoint, then
    `build_model` (packing, quantization) and a pool of its own KV heads."""
    size, rank = (tp.world_size, tp.rank) if tp is not None else (1, 0)
    local = rank_config(config, size)
    tensors = shard_weights(load_weights(spec.model_dir, config, spec.dtype), config, rank, size)
    model = build_model(local, tensors, spec.dtype, device, spec.pack_weights, spec.quantization,
                        spec.batch_invariant)
    del tensors
    if tp is not None:
        tp.vocab_size = config.vocab_size
        model.tp = tp
        for layer in model.layers:
            layer.tp = tp
    return model, KVCache(local, spec.cache, spec.dtype, device) if spec.cache is not None else None
