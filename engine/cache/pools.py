"""The paged KV cache's tensors: one K and one V pool per layer (`KVCache`), how big they are (`CacheConfig`,
`kv_bytes_per_token`). Which sequence owns which block is engine/cache/blocks.py's job."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.cache.kv_quant import QuantizedPool, bytes_per_value, check_kv_cache_dtype
from engine.core.config import ModelConfig

DEFAULT_KV_CACHE_MEMORY = 256 * 2**20  # bytes of K/V pool when neither num_blocks nor kv_cache_memory is given


@dataclass(frozen=True)
class CacheConfig:
    """How big the pool is: `num_blocks` wins; else `kv_cache_memory` bytes; else 256 MiB. What it stores:
    `kv_cache_dtype` "auto" (the model's dtype), "int8" or "fp8_e4m3" with a float16 scale per token, KV head
    and `kv_cache_group_size` dims (None: the whole head); see engine/cache/kv_quant.py."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    kv_cache_group_size: int | None = None

    def __post_init__(self) -> None:
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.kv_cache_group_size is not None and self.kv_cache_group_size < 1:
            raise ValueError(f"kv_cache_group_size must be >= 1, got {self.kv_cache_group_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be >= 1 byte, got {self.kv_cache_memory}")

    @property
    def budget(self) -> int:
        """Bytes of pool to size from when `num_blocks` is not given."""
        return self.kv_cache_memory if self.kv_cache_memory is not None else DEFAULT_KV_CACHE_MEMORY

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        budget = self.budget
        n = budget // bytes_per_block
        if n < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes is smaller than one block ({bytes_per_block} bytes)")
        return n


def kv_bytes_per_token(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                       kv_heads: Sequence[int] | None = None) -> int:
    """Cache bytes one token takes: 2 (K and V) x layers x kv_heads x head_dim x bytes per value, scales included
    (`kv_heads`: a pool's heads per layer, when it holds only some of them; engine/cache/head_plan.py)."""
    per_value = bytes_per_value(cache.kv_cache_dtype, dtype, config.head_dim, cache.kv_cache_group_size)
    heads = config.num_hidden_layers * config.num_key_value_heads if kv_heads is None else sum(kv_heads)
    return round(2 * heads * config.head_dim * per_value)


class KVCache:
    """One K pool and one V pool per layer, each `[num_blocks, block_size, n_kv_heads, head_dim]`: tensors of
    the model's dtype, or `QuantizedPool`s (8-bit codes and scales) with a quantized `kv_cache_dtype`.

    `kv_heads` (per layer) makes a pool for some of each layer's KV heads only (head-aware eviction,
    engine/cache/head_plan.py); a layer may have none. `num_blocks` overrides the cache config's sizing."""

    def __init__(self, config: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device | str,
                 kv_heads: Sequence[int] | None = None, num_blocks: int | None = None):
        self.block_size = cache.block_size
        self.kv_cache_dtype = cache.kv_cache_dtype
        self.kv_heads = list(kv_heads) if kv_heads is not None else [config.num_key_value_heads] * config.num_hidden_layers
        self.bytes_per_token = kv_bytes_per_token(config, cache, dtype, self.kv_heads)
        self.num_blocks = num_blocks or cache.resolve_num_blocks(self.bytes_per_token * cache.block_size)

        def pool(heads: int):
            shape = (self.num_blocks, cache.block_size, heads, config.head_dim)
            if cache.kv_cache_dtype == "auto":
                return torch.zeros(shape, dtype=dtype, device=device)
            return QuantizedPool.empty(shape, cache.kv_cache_dtype, dtype, device, cache.kv_cache_group_size)

        self.k = [pool(heads) for heads in self.kv_heads]
        self.v = [pool(heads) for heads in self.kv_heads]

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def pool_bytes(self) -> int:
        """Bytes the pools really occupy, read from tensor storage (not computed from the formula)."""
        return sum(p.nbytes() if isinstance(p, QuantizedPool) else p.untyped_storage().nbytes() for p in self.k + self.v)

    def copy_block(self, src: int, dst: int) -> None:
        for pool in self.k + self.v:
            if isinstance(pool, QuantizedPool):
                pool.copy_block(src, dst)
            else:
                pool[dst].copy_(pool[src])
