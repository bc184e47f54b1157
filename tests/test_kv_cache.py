"""Paged KV cache bookkeeping: block allocator, block manager (slots, fork / copy-on-write, truncate),
prefix cache (chain hashes, collision safety, LRU eviction) and memory accounting.

No model is run here: the block manager is driven directly on a small `KVCache`.
"""

from __future__ import annotations

import pytest
import torch

from engine.cache import blocks as kv_mod
from engine.cache.blocks import BlockAllocator, BlockManager, BlockTable
from engine.cache.pools import CacheConfig, KVCache
from engine.core.config import ModelConfig
from engine.core.errors import CacheFullError

LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 8


def model_config(layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=100,
        hidden_size=kv_heads * head_dim * 2,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=kv_heads * 2,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )


def make_manager(num_blocks: int = 8, block_size: int = 4, prefix: bool = True, dtype=torch.float32) -> BlockManager:
    cache = KVCache(model_config(), CacheConfig(block_size=block_size, num_blocks=num_blocks), dtype, "cpu")
    return BlockManager(cache, enable_prefix_caching=prefix)


def write_tokens(bm: BlockManager, table: BlockTable, start: int, end: int, base: float = 0.0) -> None:
    """Write distinctive K/V values for positions [start, end) through the table's slots, as the model would."""
    slots = torch.tensor(bm.slots(table, start, end))
    for layer, (k, v) in enumerate(zip(bm.kv_cache.k, bm.kv_cache.v)):
        vals = torch.arange(start, end, dtype=torch.float32) + base + 1000 * layer
        vals = vals.view(-1, 1, 1).expand(-1, KV_HEADS, HEAD_DIM)
        k.view(-1, KV_HEADS, HEAD_DIM)[slots] = vals.to(k.dtype)
        v.view(-1, KV_HEADS, HEAD_DIM)[slots] = -vals.to(v.dtype)


def run_tokens(bm: BlockManager, table: BlockTable, token_ids: list[int], upto: int, base: float = 0.0) -> None:
    """Reserve, write and commit tokens [num_cached, upto) like ModelRunner.run does."""
    start = table.num_cached_tokens
    bm.reserve(table, upto)
    write_tokens(bm, table, start, upto, base)
    bm.commit(table, token_ids, upto)


def read_k(bm: BlockManager, table: BlockTable, start: int, end: int, layer: int = 0) -> torch.Tensor:
    slots = torch.tensor(bm.slots(table, start, end))
    return bm.kv_cache.k[layer].view(-1, KV_HEADS, HEAD_DIM)[slots].clone()


def assert_all_free(bm: BlockManager) -> None:
    a = bm.allocator
    assert a.num_free == a.num_blocks
    assert a.num_used == 0
    assert all(c == 0 for c in a.ref_counts)


# ---- BlockAllocator ---------------------------------------------------------------------------------


def test_allocator_allocate_free_and_ref_counts():
    a = BlockAllocator(4)
    assert a.num_free == 4 and a.num_used == 0
    b0, b1 = a.allocate(), a.allocate()
    assert b0 != b1
    assert a.ref_counts[b0] == 1 and a.ref_counts[b1] == 1
    assert a.num_free == 2 and a.num_used == 2
    a.share(b0)
    assert a.ref_counts[b0] == 2
    a.free(b0)
    assert a.ref_counts[b0] == 1 and a.num_free == 2  # still held once
    a.free(b0)
    assert a.ref_counts[b0] == 0 and a.num_free == 3
    assert b0 in a.free_ids
    a.free(b1)
    assert a.num_free == 4
    assert sorted(a.free_ids) == [0, 1, 2, 3]  # the free list holds each block exactly once


def test_allocator_free_twice_raises():
    a = BlockAllocator(2)
    b = a.allocate()
    a.free(b)
    with pytest.raises(RuntimeError):
        a.free(b)
    with pytest.raises(RuntimeError):
        a.free(1)  # never allocated
    assert a.num_free == 2


def test_allocator_exhausted_raises_cache_full():
    a = BlockAllocator(3)
    got = {a.allocate() for _ in range(3)}
    assert got == {0, 1, 2}
    with pytest.raises(CacheFullError):
        a.allocate()
    a.free(1)
    assert a.allocate() == 1  # the freed block is handed out again


# ---- BlockManager -----------------------------------------------------------------------------------


def test_slot_mapping_across_block_boundaries():
    bm = make_manager(num_blocks=8, block_size=4)
    # Interleave two tables so their blocks are not contiguous.
    t1, t2 = BlockTable(), BlockTable()
    bm.reserve(t1, 3)
    bm.reserve(t2, 5)
    bm.reserve(t1, 10)
    assert len(t1.blocks) == 3 and len(t2.blocks) == 2
    assert len(set(t1.blocks) | set(t2.blocks)) == 5
    slots = bm.slots(t1, 0, 10)
    assert slots == [t1.blocks[p // 4] * 4 + p % 4 for p in range(10)]
    # Positions 3 -> 4 cross from block 0 to block 1; 7 -> 8 from block 1 to block 2.
    assert slots[3] == t1.blocks[0] * 4 + 3 and slots[4] == t1.blocks[1] * 4
    assert slots[7] == t1.blocks[1] * 4 + 3 and slots[8] == t1.blocks[2] * 4
    assert bm.slots(t1, 5, 9) == slots[5:9]
    assert set(slots).isdisjoint(bm.slots(t2, 0, 5))
    # reserve is idempotent for a size already covered
    bm.reserve(t1, 9)
    assert len(t1.blocks) == 3


def test_block_size_one_slots_are_block_ids():
    bm = make_manager(num_blocks=6, block_size=1)
    t = BlockTable()
    bm.reserve(t, 5)
    assert bm.slots(t, 0, 5) == t.blocks


def test_fork_shares_blocks_and_copy_on_write_of_partial_last_block():
    bm = make_manager(num_blocks=8, block_size=4, prefix=False)
    a = bm.allocator
    toks = list(range(100, 130))
    parent = BlockTable()
    run_tokens(bm, parent, toks, 6)  # blocks: [full][2 of 4]
    before = read_k(bm, parent, 0, 6)
    child = bm.fork(parent)
    assert child.blocks == parent.blocks and child.blocks is not parent.blocks
    assert child.num_cached_tokens == 6
    assert [a.ref_counts[b] for b in parent.blocks] == [2, 2]
    used = a.num_used
    assert bm.blocks_to_reserve(child, 7) == 1  # the copy

    # First write by the child to the shared, partly filled last block copies it.
    run_tokens(bm, child, toks, 7, base=500.0)
    assert child.blocks[0] == parent.blocks[0]  # the full block stays shared
    assert child.blocks[1] != parent.blocks[1]
    assert a.ref_counts[parent.blocks[0]] == 2
    assert a.ref_counts[parent.blocks[1]] == 1 and a.ref_counts[child.blocks[1]] == 1
    assert a.num_used == used + 1
    # The original's K/V are untouched, the copy has the same prefix and the child's new token.
    assert torch.equal(read_k(bm, parent, 0, 6), before)
    assert torch.equal(read_k(bm, child, 0, 6), before)
    assert float(read_k(bm, child, 6, 7)[0, 0, 0]) == 506.0
    # Whole-block comparison: the copy's first two slots equal the original's, including V.
    for pool in bm.kv_cache.k + bm.kv_cache.v:
        assert torch.equal(pool[child.blocks[1]][:2], pool[parent.blocks[1]][:2])
    # The parent's own block is no longer shared, so its next write is in place.
    assert bm.blocks_to_reserve(parent, 7) == 0
    old = parent.blocks[1]
    run_tokens(bm, parent, toks, 7, base=900.0)
    assert parent.blocks[1] == old
    assert float(read_k(bm, child, 6, 7)[0, 0, 0]) == 506.0  # not overwritten by the parent
    assert float(read_k(bm, parent, 6, 7)[0, 0, 0]) == 906.0
    bm.release(parent)
    bm.release(child)
    assert_all_free(bm)


def test_fork_on_block_boundary_needs_no_copy():
    bm = make_manager(num_blocks=8, block_size=4, prefix=False)
    parent = BlockTable()
    run_tokens(bm, parent, list(range(8)), 8)
    child = bm.fork(parent)
    assert bm.blocks_to_reserve(child, 9) == 1  # one fresh block, no copy
    run_tokens(bm, child, list(range(9)), 9)
    assert child.blocks[:2] == parent.blocks
    assert all(bm.allocator.ref_counts[b] == 2 for b in parent.blocks)
    bm.release(child)
    assert all(bm.allocator.ref_counts[b] == 1 for b in parent.blocks)
    bm.release(parent)
    assert_all_free(bm)


def test_reserve_raises_cache_full_without_allocating():
    bm = make_manager(num_blocks=3, block_size=4)
    t = BlockTable()
    bm.reserve(t, 8)
    with pytest.raises(CacheFullError):
        bm.reserve(t, 20)
    assert len(t.blocks) == 2 and bm.allocator.num_free == 1  # nothing partially taken
    bm.release(t)
    assert_all_free(bm)


def test_truncate_frees_blocks_and_release_returns_everything():
    bm = make_manager(num_blocks=8, block_size=4, prefix=False)
    t = BlockTable()
    toks = list(range(20))
    run_tokens(bm, t, toks, 14)  # 4 blocks
    assert len(t.blocks) == 4 and bm.allocator.num_used == 4
    kept = t.blocks[:2]
    bm.truncate(t, 7)
    assert t.blocks == kept and t.num_cached_tokens == 7
    assert bm.allocator.num_used == 2
    bm.truncate(t, 8)  # past what is cached: nothing to free, nothing gained
    assert t.num_cached_tokens == 7 and len(t.blocks) == 2
    bm.truncate(t, 4)
    assert t.blocks == kept[:1] and bm.allocator.num_used == 1
    run_tokens(bm, t, toks, 10)
    assert len(t.blocks) == 3
    bm.release(t)
    assert t.blocks == [] and t.num_cached_tokens == 0
    assert_all_free(bm)


def test_truncate_shared_table_keeps_other_owner_intact():
    bm = make_manager(num_blocks=8, block_size=4)
    toks = list(range(40, 60))
    parent = BlockTable()
    run_tokens(bm, parent, toks, 11)
    snapshot = read_k(bm, parent, 0, 11)
    child = bm.fork(parent)
    bm.truncate(child, 5)  # into the shared second block
    run_tokens(bm, child, toks[:5] + [1, 2, 3, 4], 9, base=300.0)
    assert torch.equal(read_k(bm, parent, 0, 11), snapshot)
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    bm.release(child)
    bm.release(parent)
    assert_all_free(bm)


def test_held_bytes_counts_partly_filled_last_block():
    bm = make_manager(num_blocks=8, block_size=4)
    t = BlockTable()
    bm.reserve(t, 5)
    bytes_per_block = bm.kv_cache.bytes_per_token * 4
    assert bm.kv_cache.bytes_per_block == bytes_per_block
    assert bm.held_bytes(t) == 2 * bytes_per_block
    bm.reserve(t, 8)
    assert bm.held_bytes(t) == 2 * bytes_per_block
    bm.reserve(t, 9)
    assert bm.held_bytes(t) == 3 * bytes_per_block
    bm.release(t)
    assert bm.held_bytes(t) == 0


# ---- prefix cache -----------------------------------------------------------------------------------


def test_prefix_cache_reuses_same_prefix_blocks():
    bm = make_manager(num_blocks=8, block_size=4)
    toks = list(range(10, 21))  # 11 tokens: two full blocks + 3
    a = BlockTable()
    run_tokens(bm, a, toks, 11)
    data = read_k(bm, a, 0, 8)
    b = BlockTable()
    reused = bm.match_prefix(b, toks + [99])
    assert reused == 8 and b.num_cached_tokens == 8
    assert b.blocks == a.blocks[:2]
    assert all(bm.allocator.ref_counts[x] == 2 for x in a.blocks[:2])
    bm.record_prefix_lookup(len(toks) + 1, reused)
    assert (bm.prefix_queries, bm.prefix_hits) == (2, 2)
    assert torch.equal(read_k(bm, b, 0, 8), data)
    # Nothing is reused for a different first block, even when the second block's tokens match:
    c = BlockTable()
    assert bm.match_prefix(c, [0, 0, 0, 0] + toks[4:]) == 0 and c.blocks == []
    # Same first block, different second block: only the first is reused.
    d = BlockTable()
    assert bm.match_prefix(d, toks[:4] + [7, 7, 7, 7, 7]) == 4 and d.blocks == a.blocks[:1]
    for t in (a, b, d):
        bm.release(t)
    assert_all_free(bm)


def test_prefix_cache_hash_chains_on_the_parent():
    # A block's K/V depend on every token before it, so a block with the same tokens after a different
    # prefix must not be reused: the hash chains the parent's hash.
    bm = make_manager(num_blocks=8, block_size=4)
    A, B, C, D = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4]
    y, z = BlockTable(), BlockTable()
    run_tokens(bm, y, C + B, 8)  # registers C and B-after-C
    run_tokens(bm, z, A + D, 8)  # registers A and D-after-A
    x = BlockTable()
    assert bm.match_prefix(x, A + B + [0]) == 4
    assert x.blocks == z.blocks[:1]
    assert kv_mod.chain_hash(None, tuple(B)) != kv_mod.chain_hash(kv_mod.chain_hash(None, tuple(A)), tuple(B))
    for t in (x, y, z):
        bm.release(t)
    assert_all_free(bm)


def test_prefix_cache_never_reuses_the_block_of_the_last_token():
    bm = make_manager(num_blocks=8, block_size=4)
    toks = list(range(8))
    a = BlockTable()
    run_tokens(bm, a, toks, 8)
    b = BlockTable()
    # All 8 tokens are cached, but the last token's logits must be computed: only the first block is reused.
    assert bm.match_prefix(b, toks) == 4
    c = BlockTable()
    assert bm.match_prefix(c, toks[:4]) == 0
    for t in (a, b, c):
        bm.release(t)
    assert_all_free(bm)


def test_prefix_cache_freed_blocks_stay_reusable_until_evicted():
    bm = make_manager(num_blocks=4, block_size=4)
    toks = list(range(30, 39))
    a = BlockTable()
    run_tokens(bm, a, toks, 9)
    cached = a.blocks[:2]
    bm.release(a)
    assert_all_free(bm)  # cached-but-unreferenced blocks count as free
    b = BlockTable()
    assert bm.match_prefix(b, toks) == 8 and b.blocks == cached
    assert bm.allocator.num_free == 2
    bm.release(b)


def test_prefix_cache_disabled_reuses_nothing():
    bm = make_manager(num_blocks=8, block_size=4, prefix=False)
    toks = list(range(12))
    a = BlockTable()
    run_tokens(bm, a, toks, 12)
    b = BlockTable()
    assert bm.match_prefix(b, toks + [1]) == 0 and b.blocks == []
    bm.release(a)
    assert_all_free(bm)


def test_prefix_cache_hash_collision_is_not_reused(monkeypatch):
    monkeypatch.setattr(kv_mod, "chain_hash", lambda parent, tokens: 12345)
    bm = make_manager(num_blocks=8, block_size=4)
    x = [1, 2, 3, 4, 5]
    y = [9, 9, 9, 9, 5]
    a = BlockTable()
    run_tokens(bm, a, x, 5)
    b = BlockTable()
    assert bm.match_prefix(b, y) == 0 and b.blocks == []  # same hash, different tokens
    assert bm.allocator.ref_counts[a.blocks[0]] == 1
    c = BlockTable()
    assert bm.match_prefix(c, x) == 4 and c.blocks == a.blocks[:1]  # same hash, same tokens
    for t in (a, b, c):
        bm.release(t)
    assert_all_free(bm)


def test_prefix_cache_evicts_least_recently_used_first():
    bm = make_manager(num_blocks=4, block_size=4)
    p = [1, 1, 1, 1, 0]
    q = [2, 2, 2, 2, 0]
    ta, tb = BlockTable(), BlockTable()
    run_tokens(bm, ta, p, 4)
    run_tokens(bm, tb, q, 4)
    block_p, block_q = ta.blocks[0], tb.blocks[0]
    bm.release(ta)  # p freed first ...
    bm.release(tb)
    touch = BlockTable()
    assert bm.match_prefix(touch, p) == 4  # ... but then used again, so q is now the least recent
    bm.release(touch)
    assert_all_free(bm)
    # Take every truly free block plus one evictable one.
    filler = BlockTable()
    bm.reserve(filler, 3 * 4)
    assert block_q in filler.blocks and block_p not in filler.blocks
    hit_p, hit_q = BlockTable(), BlockTable()
    assert bm.match_prefix(hit_p, p) == 4 and hit_p.blocks == [block_p]
    assert bm.match_prefix(hit_q, q) == 0
    # The evicted block's old hash is gone: it can be written with new content and registered again.
    for t in (filler, hit_p, hit_q):
        bm.release(t)
    assert_all_free(bm)


def test_truncating_a_private_cached_block_unregisters_it():
    bm = make_manager(num_blocks=8, block_size=4)
    toks = [5, 6, 7, 8, 9]
    a = BlockTable()
    run_tokens(bm, a, toks, 5)
    bm.truncate(a, 2)  # the first block will be overwritten in place from position 2
    run_tokens(bm, a, [5, 6, 0, 0, 0], 5, base=77.0)
    b = BlockTable()
    assert bm.match_prefix(b, toks) == 0  # stale content must not be found under the old hash
    c = BlockTable()
    assert bm.match_prefix(c, [5, 6, 0, 0, 0]) == 4
    for t in (a, b, c):
        bm.release(t)
    assert_all_free(bm)


# ---- accounting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_per_token_and_pool_bytes(dtype):
    cfg = model_config()
    nbytes = torch.empty((), dtype=dtype).element_size()
    cache = KVCache(cfg, CacheConfig(block_size=16, num_blocks=5), dtype, "cpu")
    assert cache.bytes_per_token == 2 * LAYERS * KV_HEADS * HEAD_DIM * nbytes
    assert cache.bytes_per_block == cache.bytes_per_token * 16
    assert cache.pool_bytes() == 5 * 16 * cache.bytes_per_token
    assert all(t.dtype == dtype for t in cache.k + cache.v)
    assert len(cache.k) == len(cache.v) == LAYERS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sizing_from_kv_cache_memory(dtype):
    cfg = model_config()
    nbytes = torch.empty((), dtype=dtype).element_size()
    per_block = 2 * LAYERS * KV_HEADS * HEAD_DIM * nbytes * 16
    budget = 10 * per_block + per_block // 2  # a partial block's worth is not enough for another block
    cache = KVCache(cfg, CacheConfig(block_size=16, kv_cache_memory=budget), dtype, "cpu")
    assert cache.num_blocks == 10
    assert cache.pool_bytes() == 10 * per_block <= budget
    # num_blocks wins over kv_cache_memory
    cache = KVCache(cfg, CacheConfig(block_size=16, num_blocks=3, kv_cache_memory=budget), dtype, "cpu")
    assert cache.num_blocks == 3
    # Default: 256 MiB
    assert CacheConfig().resolve_num_blocks(per_block) == 256 * 2**20 // per_block
    with pytest.raises(ValueError):
        KVCache(cfg, CacheConfig(block_size=16, kv_cache_memory=per_block - 1), dtype, "cpu")


@pytest.mark.parametrize(
    "kwargs",
    [dict(block_size=0), dict(num_blocks=0), dict(kv_cache_memory=0)],
    ids=["block_size", "num_blocks", "memory"],
)
def test_cache_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("group", [None, 4])
def test_quantized_pool_bytes_and_round_trip(kv_cache_dtype, group):
    """8-bit codes plus a float16 scale per token, KV head and group: the formula, the storage and the values."""
    cfg = model_config()
    cache = KVCache(cfg, CacheConfig(block_size=16, num_blocks=5, kv_cache_dtype=kv_cache_dtype,
                                     kv_cache_group_size=group), torch.bfloat16, "cpu")
    scales = HEAD_DIM // (group or HEAD_DIM)
    assert cache.bytes_per_token == 2 * LAYERS * KV_HEADS * (HEAD_DIM + 2 * scales)
    assert cache.pool_bytes() == 5 * 16 * cache.bytes_per_token
    pool = cache.k[0]
    x = torch.randn(7, KV_HEADS, HEAD_DIM) * torch.logspace(-3, 2, 7).view(7, 1, 1)  # scales far apart per token
    slots = torch.tensor([0, 5, 16, 17, 40, 41, 79])
    pool.write(slots, x.to(torch.bfloat16))
    back = pool.gather(slots.view(1, -1))[0].float()
    err = (back - x).abs().amax(dim=-1) / x.abs().amax(dim=-1)  # per token and head, relative to its max
    assert back.dtype == torch.float32 and back.shape == x.shape
    assert err.max() < (0.01 if kv_cache_dtype == "int8" else 0.07)
    cache.copy_block(1, 3)
    assert torch.equal(pool.gather(torch.tensor([[48, 49]])), pool.gather(torch.tensor([[16, 17]])))
