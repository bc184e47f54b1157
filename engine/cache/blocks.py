"""Paged KV cache bookkeeping in plain Python: a ref-counted block allocator with prefix reuse, per-sequence
block tables and the manager that reserves, shares (copy-on-write), evicts and frees blocks. The tensors
live in engine/cache/pools.py."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.cache.head_plan import HeadSplit
from engine.cache.kv_policy import KVPolicy
from engine.cache.pools import KVCache
from engine.core.errors import CacheFullError


class BlockAllocator:
    """Free list with reference counts, plus a prefix cache of full blocks keyed by chained hash.

    A block whose count drops to zero and that holds a hashed full block stays findable by its hash
    (reusable for a later shared prefix) until it is evicted, least recently used first.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.block_hash: dict[int, int] = {}  # block id -> hash of its content
        self.hash_to_block: dict[int, int] = {}
        self.block_tokens: dict[int, tuple[int, ...]] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with count 0, LRU first

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (truly free plus evictable cached ones)."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self.free_ids:
            block = self.free_ids.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            self._unhash(block)
        else:
            raise CacheFullError(f"KV cache is full: all {self.num_blocks} blocks are in use")
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """Take one more reference to a block (fork or prefix hit)."""
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        count = self.ref_counts[block]
        if count <= 0:
            raise RuntimeError(f"block {block} freed more often than it was allocated")
        self.ref_counts[block] = count - 1
        if count == 1:
            if block in self.block_hash:
                self.evictable[block] = None
            else:
                self.free_ids.append(block)

    # ---- prefix caching -------------------------------------------------------------------------
    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> int | None:
        """A cached block with this hash *and* these tokens (hash collisions are checked), or None."""
        block = self.hash_to_block.get(block_hash)
        if block is None or self.block_tokens.get(block) != tokens:
            return None
        return block

    def register(self, block: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """Record that `block` now holds a full block of `tokens` so later prefixes can reuse it."""
        if block_hash in self.hash_to_block or block in self.block_hash:
            return
        self.block_hash[block] = block_hash
        self.hash_to_block[block_hash] = block
        self.block_tokens[block] = tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash; blocks nobody holds become plain free blocks."""
        self.free_ids.extend(self.evictable)
        self.evictable.clear()
        self.block_hash.clear()
        self.hash_to_block.clear()
        self.block_tokens.clear()

    def forget(self, block: int) -> None:
        """Drop a block from the prefix cache (its content is about to change)."""
        self._unhash(block)

    def _unhash(self, block: int) -> None:
        h = self.block_hash.pop(block, None)
        if h is not None:
            self.hash_to_block.pop(h, None)
        self.block_tokens.pop(block, None)


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Hash of a full block that depends on every token before it (the parent's hash)."""
    return hash((parent, tokens))


EVICTED = -1  # a block table entry whose block a kv_policy gave back (engine/cache/kv_policy.py)


@dataclass
class BlockTable:
    """The blocks one sequence holds, in order, and how many of its tokens have K/V written.

    With a kv_policy, evicted entries are `EVICTED`: the table keeps its logical length (entry i still covers
    positions i * block_size ...), so positions and `blocks_needed` arithmetic stay as they are."""

    blocks: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens whose K/V are in the blocks
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the leading full blocks
    # Head-aware eviction (engine/cache/head_plan.py): the same tokens' blocks in the window heads' pool, where the
    # manager's `window` tier evicts; None without it. Its `num_cached_tokens` follows this table's.
    window: BlockTable | None = None

    @property
    def live_blocks(self) -> list[int]:
        return [b for b in self.blocks if b != EVICTED]

    @property
    def has_evicted(self) -> bool:
        return EVICTED in self.blocks or (self.window is not None and self.window.has_evicted)

    def set_cached(self, num_tokens: int) -> None:
        """Say `num_tokens` have K/V (a failed step is undone this way), in the window table too."""
        self.num_cached_tokens = num_tokens
        if self.window is not None:
            self.window.num_cached_tokens = num_tokens


@dataclass
class WindowTier:
    """The window heads' pool of a head-aware engine: its blocks (every `BlockTable.window`), the sink + window
    policy that evicts them, and each layer's `HeadSplit`."""

    blocks: BlockManager  # a manager of its own over the window pool
    policy: KVPolicy
    splits: list[HeadSplit]


class BlockManager:
    """Gives sequences blocks, copy-on-write for shared partly filled blocks, and prefix reuse."""

    def __init__(self, kv_cache: KVCache, enable_prefix_caching: bool = True, window: WindowTier | None = None):
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.allocator = BlockAllocator(kv_cache.num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        # Head-aware eviction: every table also holds blocks of the window heads' pool (`BlockTable.window`),
        # reserved, committed, forked and released with it, evicted by the tier's policy (engine/cache/head_plan.py).
        self.window = window
        self.prefix_queries = 0  # full prompt blocks looked up (once per request, see record_prefix_lookup)
        self.prefix_hits = 0  # of which were found cached

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return self.allocator.num_free >= num_blocks

    def match_prefix(self, table: BlockTable, token_ids: list[int]) -> int:
        """Attach cached blocks for the longest full-block prefix of `token_ids`; returns tokens reused.

        Never reuses the block holding the last token: its logits must be computed, so at least one
        token of the prompt is always run through the model.
        """
        if not self.enable_prefix_caching or table.blocks:
            return 0
        bs, parent = self.block_size, None
        for start in range(0, len(token_ids) - 1 - (len(token_ids) - 1) % bs, bs):
            tokens = tuple(token_ids[start : start + bs])
            h = chain_hash(parent, tokens)
            block = self.allocator.lookup(h, tokens)
            if block is None:
                break
            self.allocator.share(block)
            table.blocks.append(block)
            table.block_hashes.append(h)
            parent = h
        table.num_cached_tokens = len(table.blocks) * bs
        return table.num_cached_tokens

    def record_prefix_lookup(self, num_tokens: int, reused_tokens: int) -> None:
        """Count one request's lookup: the full blocks it could have reused and those it did."""
        self.prefix_queries += (num_tokens - 1) // self.block_size
        self.prefix_hits += reused_tokens // self.block_size

    def blocks_to_reserve(self, table: BlockTable, num_tokens: int) -> int:
        """New blocks `reserve(table, num_tokens)` would take (copy-on-write included)."""
        need = max(self.blocks_needed(num_tokens) - len(table.blocks), 0)
        return need + self._needs_copy_on_write(table, num_tokens)

    def can_reserve(self, table: BlockTable, num_tokens: int) -> bool:
        """Whether `reserve(table, num_tokens)` would succeed (in the window tier too)."""
        if self.window is not None and not self.window.blocks.can_reserve(table.window or BlockTable(), num_tokens):
            return False
        return self.can_allocate(self.blocks_to_reserve(table, num_tokens))

    def reserve(self, table: BlockTable, num_tokens: int) -> None:
        """Make room for `num_tokens` in total, allocating blocks and un-sharing a shared last block."""
        if self.window is not None:
            if table.window is None:
                table.window = BlockTable(num_cached_tokens=table.num_cached_tokens)
            self.window.blocks.reserve(table.window, num_tokens)
        need = self.blocks_needed(num_tokens) - len(table.blocks)
        cow = self._needs_copy_on_write(table, num_tokens)
        if max(need, 0) + cow > self.allocator.num_free:
            raise CacheFullError(
                f"KV cache is full: need {max(need, 0) + cow} more blocks of {self.block_size} tokens, "
                f"{self.allocator.num_free} free of {self.allocator.num_blocks}"
            )
        if cow:
            self._copy_on_write(table)
        for _ in range(max(need, 0)):
            table.blocks.append(self.allocator.allocate())

    def _needs_copy_on_write(self, table: BlockTable, num_tokens: int) -> int:
        if table.num_cached_tokens % self.block_size == 0 or num_tokens <= table.num_cached_tokens:
            return 0
        last = table.blocks[(table.num_cached_tokens - 1) // self.block_size]
        return int(last != EVICTED and self.allocator.ref_counts[last] > 1)

    def _copy_on_write(self, table: BlockTable) -> None:
        idx = (table.num_cached_tokens - 1) // self.block_size
        old = table.blocks[idx]
        new = self.allocator.allocate()
        self.kv_cache.copy_block(old, new)
        self.allocator.free(old)
        table.blocks[idx] = new

    def slots(self, table: BlockTable, start: int, end: int) -> list[int]:
        """Flat slot index (block * block_size + offset) of each token position in [start, end)."""
        bs, blocks = self.block_size, table.blocks
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def commit(self, table: BlockTable, token_ids: list[int], num_tokens: int, shareable: int | None = None) -> None:
        """Mark `num_tokens` as written and register newly completed full blocks for prefix reuse: those
        within the first `shareable` tokens (default: all; with batch invariance a sequence's generated
        tokens were computed as decode rows, which a prompt that holds them would compute otherwise)."""
        table.set_cached(num_tokens)
        if not self.enable_prefix_caching or table.has_evicted:
            # After an eviction, new K/V are computed without the evicted keys: they must never be shared.
            return
        bs = self.block_size
        end = num_tokens if shareable is None else min(num_tokens, shareable)
        for i in range(len(table.block_hashes), end // bs):
            parent = table.block_hashes[-1] if table.block_hashes else None
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, tokens)
            table.block_hashes.append(h)
            self.allocator.register(table.blocks[i], h, tokens)

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing every block (copy-on-write happens on the first write to a shared block)."""
        for block in table.live_blocks:
            self.allocator.share(block)
        window = self.window.blocks.fork(table.window) if table.window is not None else None
        return BlockTable(list(table.blocks), table.num_cached_tokens, list(table.block_hashes), window)

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Drop cached tokens past `num_tokens`, freeing blocks that are no longer needed."""
        if table.window is not None:
            self.window.blocks.truncate(table.window, num_tokens)
        keep = self.blocks_needed(num_tokens)
        if num_tokens % self.block_size and keep <= len(table.blocks) and table.blocks[keep - 1] != EVICTED:
            self._unhash_if_private(table.blocks[keep - 1])
        for block in table.blocks[keep:]:
            if block != EVICTED:
                self.allocator.free(block)
        del table.blocks[keep:]
        del table.block_hashes[num_tokens // self.block_size :]
        table.num_cached_tokens = min(table.num_cached_tokens, num_tokens)

    def _unhash_if_private(self, block: int) -> None:
        # The block is about to be overwritten in place; a shared one is copied on write instead.
        if self.allocator.ref_counts[block] == 1:
            self.allocator.forget(block)

    def reset_prefix_cache(self) -> None:
        """Start the prefix cache (and its hit counters) cold; blocks in use are untouched."""
        self.allocator.reset_prefix_cache()
        self.prefix_queries = self.prefix_hits = 0

    def release(self, table: BlockTable) -> None:
        """Return every block of a finished, aborted or preempted sequence."""
        self.truncate(table, 0)

    def held_bytes(self, table: BlockTable) -> int:
        """Cache bytes this sequence holds (whole blocks, including a partly filled last one; both tiers)."""
        window = self.window.blocks.held_bytes(table.window) if table.window is not None else 0
        return len(table.live_blocks) * self.kv_cache.bytes_per_block + window

    # ---- sink + window eviction (engine/cache/kv_policy.py) ---------------------------------------------------
    def evict(self, table: BlockTable, policy: KVPolicy, num_tokens: int) -> int:
        """Give back the blocks that the window of the sequence's newest token (`num_tokens`: its length with
        that token) no longer reads; returns how many. A freed block the prefix cache knows stays findable
        until reused: its contents are unchanged and were computed before any eviction (see `commit`)."""
        freed, end = 0, min(policy.first_window_block(num_tokens, self.block_size), len(table.blocks))
        for i in range(policy.sink_blocks(self.block_size), end):
            if table.blocks[i] != EVICTED:
                self.allocator.free(table.blocks[i])
                table.blocks[i] = EVICTED
                freed += 1
        return freed

    def evict_window(self, table: BlockTable, num_tokens: int) -> int:
        """Head-aware eviction: `evict` in the window tier, under its policy (nothing without a window tier).
        Only blocks already computed may go: call it for a token whose predecessors all have K/V."""
        if self.window is None or table.window is None:
            return 0
        return self.window.blocks.evict(table.window, self.window.policy, num_tokens)

    def blocks_to_recompute(self, policy: KVPolicy, num_tokens: int) -> int:
        """Blocks `reserve_window` takes for a sequence of `num_tokens` tokens."""
        total = self.blocks_needed(num_tokens)
        return total - max(0, min(policy.first_window_block(num_tokens, self.block_size), total)
                           - policy.sink_blocks(self.block_size))

    def reserve_window(self, table: BlockTable, policy: KVPolicy, num_tokens: int) -> None:
        """Lay out an empty table to recompute a preempted windowed sequence: blocks for what its newest token
        reads (sink and window), `EVICTED` between, so the tokens its window dropped are never recomputed."""
        need = self.blocks_to_recompute(policy, num_tokens)
        if need > self.allocator.num_free:
            raise CacheFullError(f"KV cache is full: need {need} blocks, {self.allocator.num_free} free")
        sink, first = policy.sink_blocks(self.block_size), policy.first_window_block(num_tokens, self.block_size)
        table.blocks = [EVICTED if sink <= i < first else self.allocator.allocate()
                        for i in range(self.blocks_needed(num_tokens))]

    def skip_evicted(self, table: BlockTable) -> None:
        """Move `num_cached_tokens` past evicted blocks (a recompute laid out by `reserve_window`)."""
        bs, blocks = self.block_size, table.blocks
        while table.num_cached_tokens % bs == 0 and table.num_cached_tokens // bs < len(blocks) \
                and blocks[table.num_cached_tokens // bs] == EVICTED:
            table.num_cached_tokens += bs

    def held_run(self, table: BlockTable, start: int) -> int | None:
        """Positions from `start` before the next evicted block (None: none follows), so that one chunk of
        new tokens never reaches into the tokens a window dropped."""
        i = start // self.block_size
        while i < len(table.blocks) and table.blocks[i] != EVICTED:
            i += 1
        return i * self.block_size - start if i < len(table.blocks) else None
