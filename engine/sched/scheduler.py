"""First-come-first-served scheduling with chunked prefill, a token budget and recompute preemption."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.cache.blocks import BlockManager
from engine.model.invariance import tile_boundary_below
from engine.sched.sequence import ScheduledSeq, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # new tokens per step, decode rows and prefill chunks together
    # Batch invariance (engine/model/invariance.py): a prompt chunk cut short by the budget ends on a tile boundary,
    # so that no tile is computed twice (its rows would be right either way, at twice the cost).
    tile_aligned_chunks: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


class Scheduler:
    """Decides, each step, which sequences run and how many of their tokens.

    Running sequences go first (oldest first): one token each when decoding, the next chunk when their
    prompt is still being prefilled. Waiting requests are then admitted in arrival order while the token
    budget, `max_num_seqs` and free blocks for their whole prompt allow. When a running sequence needs a
    block and none is free, the newest running sequence is preempted: its blocks are freed and it goes back
    to the front of the queue, to be recomputed from its tokens (prompt and output so far; a sequence with a
    kv_policy recomputes only its sink and window, see `_num_new_tokens`).
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        work: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._num_new_tokens(seq, budget)
            if not self._make_room(seq, n):
                continue  # `seq` itself was preempted
            work.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # A preempted windowed sequence recomputes only what its next token reads (its sink and window).
            recompute_window = seq.kv_policy is not None and bool(seq.output_ids) and not seq.block_table.blocks
            lookup = not seq.block_table.blocks and not seq.computes_whole_prompt and not recompute_window
            reused = self.blocks.match_prefix(seq.block_table, seq.token_ids) if lookup else 0
            if recompute_window:
                fits = self.blocks.can_allocate(self.blocks.blocks_to_recompute(seq.kv_policy, seq.num_tokens))
            else:
                fits = self.blocks.can_reserve(seq.block_table, seq.num_tokens)
            if not fits:
                # Never wait while holding prefix-cache blocks: waiting sequences that each hold some
                # blocks could otherwise starve one another forever.
                self.blocks.release(seq.block_table)
                break  # admitted only when its whole prompt fits: FCFS, so nobody jumps the queue
            if recompute_window:
                self.blocks.reserve_window(seq.block_table, seq.kv_policy, seq.num_tokens)
            n = self._num_new_tokens(seq, budget)
            self.blocks.reserve(seq.block_table, seq.num_computed + n)
            self.waiting.popleft()
            if not seq.admitted:  # counted once: a request that waits re-matches every step, a preempted one too
                seq.admitted = True
                seq.num_cached_prompt_tokens = reused
                if lookup:
                    self.blocks.record_prefix_lookup(seq.num_tokens, reused)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            work.append(ScheduledSeq(seq, n))
            budget -= n
        return work

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """How many of `seq`'s tokens to compute this step: the rest of it, within the budget.

        A windowed sequence (engine/cache/kv_policy.py) first gives back the blocks its newest token's window no
        longer reads (when decoding; its prompt is prefilled with full attention), or, when recomputing after
        preemption, skips the tokens its window had dropped and stops before the next dropped ones."""
        table, policy = seq.block_table, seq.kv_policy
        if seq.num_computed == seq.num_tokens - 1:  # decoding: head-aware eviction's window heads move on
            self.blocks.evict_window(table, seq.num_tokens)
        if policy is not None:
            if seq.num_computed >= seq.num_prompt_tokens:
                self.blocks.evict(table, policy, seq.num_tokens)
            self.blocks.skip_evicted(table)
        n = min(seq.num_tokens - seq.num_computed, budget)
        if policy is not None and (run := self.blocks.held_run(table, seq.num_computed)) is not None:
            n = min(n, run)
        if self.config.tile_aligned_chunks and seq.num_computed + n < seq.num_prompt_tokens:
            n = tile_boundary_below(seq.num_computed, seq.num_computed + n) - seq.num_computed
        return n

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Reserve blocks for `num_new` tokens of `seq`, preempting newer sequences if needed."""
        table = seq.block_table
        while True:
            if self.blocks.can_reserve(table, seq.num_computed + num_new):
                self.blocks.reserve(table, seq.num_computed + num_new)
                return True
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and put it back at the front of the queue for recompute."""
        self.blocks.release(seq.block_table)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out (finished or aborted) and return all its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
