"""Head-aware eviction's pools: how the cache budget divides between the full heads' pool and the window heads'
pool (`head_aware_pools`), and the `BlockManager` over both (`head_aware_blocks`). The plan itself is
engine/cache/head_plan.py."""

from __future__ import annotations

import torch

from engine.cache.blocks import BlockManager, WindowTier
from engine.cache.head_plan import HeadPlan, HeadSplit
from engine.cache.kv_policy import KVPolicy
from engine.cache.pools import CacheConfig, KVCache, kv_bytes_per_token
from engine.core.config import ModelConfig


def head_aware_pools(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype, plan: HeadPlan, policy: KVPolicy,
                     max_num_seqs: int, max_model_len: int) -> tuple[int, int]:
    """Blocks of the full heads' pool and of the window heads' pool, from the cache's budget.

    The full pool grows with every sequence; a decoding sequence holds at most `policy.max_blocks` window
    blocks, but a prompt (and a preempted sequence's recompute) is prefilled with full attention in both pools.
    So the window pool gets room for one sequence of `max_model_len` tokens plus a window for each sequence of
    that length the full pool holds (at most `max_num_seqs`; never more blocks than the full pool), and the
    full pool the rest of the budget (`cache.num_blocks`, when given, sizes the full pool)."""
    plan.check(config)
    if plan.num_full == 0:
        raise ValueError("the head plan keeps no KV head's full cache: use kv_policy alone for sink + window "
                         "eviction of every head")
    bs = cache.block_size
    full_block = kv_bytes_per_token(config, cache, dtype, plan_heads(plan, full=True)) * bs
    window_block = kv_bytes_per_token(config, cache, dtype, plan_heads(plan, full=False)) * bs
    longest, window = -(-max_model_len // bs), policy.max_blocks(bs)  # blocks of one whole sequence, of a window

    def windows(num_full: int) -> int:  # window blocks for the sequences of `longest` blocks the full pool holds
        return longest + min(max_num_seqs, max(1, num_full // longest)) * window

    if cache.num_blocks is not None:
        num_full = cache.num_blocks
    else:
        # Every full sequence brings a window: solve budget = full x (full_block + window x window_block /
        # longest) + longest x window_block, then give the full pool what the rounded window count leaves.
        num_full = int((cache.budget - longest * window_block) / (full_block + window * window_block / longest))
        num_full = (cache.budget - windows(max(num_full, 0)) * window_block) // full_block
        if num_full < windows(num_full):  # too small a budget for that: equal pools
            num_full = cache.budget // (full_block + window_block)
    if num_full < 1:
        raise ValueError(f"kv_cache_memory={cache.budget} bytes is smaller than one block of both pools "
                         f"({full_block + window_block} bytes)")
    return num_full, min(num_full, windows(num_full))


def plan_heads(plan: HeadPlan, full: bool) -> list[int]:
    """KV heads per layer of the full pool (or of the window pool)."""
    return [len(h) if full else plan.num_kv_heads - len(h) for h in plan.full_kv_heads]


def head_aware_blocks(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device, plan: HeadPlan,
                      policy: KVPolicy, max_num_seqs: int, max_model_len: int) -> BlockManager:
    """A BlockManager over the full heads' pool whose `window` tier holds the window heads' pool (sized by
    `head_aware_pools`). Prefix caching is off: K/V computed after an eviction differ from a full cache's."""
    num_full, num_window = head_aware_pools(config, cache, dtype, plan, policy, max_num_seqs, max_model_len)
    group = config.num_attention_heads // config.num_key_value_heads
    splits = [HeadSplit.for_layer(plan, layer, group, device) for layer in range(config.num_hidden_layers)]
    window_pool = KVCache(config, cache, dtype, device, plan_heads(plan, full=False), num_window)
    tier = WindowTier(BlockManager(window_pool, enable_prefix_caching=False), policy, splits)
    full_pool = KVCache(config, cache, dtype, device, plan_heads(plan, full=True), num_full)
    return BlockManager(full_pool, enable_prefix_caching=False, window=tier)
