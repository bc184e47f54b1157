"""Turns scheduled sequences into one flat batch, runs the model, and returns last-position logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.cache.blocks import EVICTED, BlockManager, BlockTable
from engine.cache.kv_policy import KVPolicy
from engine.cache.pools import KVCache
from engine.capture.sink import CaptureSink
from engine.core.config import ModelConfig
from engine.exec.step import LocalExecutor, StepInputs
from engine.model.attention import (
    AttentionMetadata,
    DecodeBatch,
    PrefillSegment,
    SinkRotation,
    WindowAttention,
    group_by_length,
)
from engine.model.compiled import CompiledDecoder
from engine.model.invariance import RowPlan, RowTile, prompt_tile
from engine.model.llama import LlamaModel
from engine.sched.sequence import ScheduledSeq, Sequence


class StepExecutor(Protocol):
    """What runs a step the runner built: on this process alone, or on every tensor-parallel rank. Returns the
    logits of `step.logit_rows` and the capture sinks over every head (joined across ranks)."""

    every_head: bool  # a rank captures only its heads, to be joined: each sink keeps every head's rows
    decoder: CompiledDecoder | None

    def execute(self, step: StepInputs, sinks: list[CaptureSink]) -> tuple[list, list[CaptureSink]]: ...


# Decode rows are attended in batches of similar length: a batch may carry this many padded key positions
# (each batch costs two cache gathers and one attention call per layer) and this many keys in all (so its
# gathered K/V stay in cache for the attention that reads them). Tuned in docs/PERFORMANCE.md.
DECODE_MAX_PADDING = 256
DECODE_MAX_KEYS = 4096


@dataclass
class DecodeRow:
    """One query row of a decode batch: the token of `seq` at `position`, attending to the keys before it."""

    seq: Sequence
    position: int
    token_id: int | None = None  # a draft token (engine/sampling/speculative.py); None: the sequence's own token there


@dataclass
class Segment:
    """Prompt positions [start, start + num_tokens) of `seq` computed together: a chunk, or with batch
    invariance the part of one prompt tile (`tile_start`, `tile_size`) that this step computes."""

    seq: Sequence
    start: int
    num_tokens: int
    tile_start: int = 0
    tile_size: int = 0


@dataclass
class StepLayout:
    """The flat batch of one step in row order: the decode rows, then the prompt segments."""

    decode: list[DecodeRow]
    segments: list[Segment]

    def token_ids(self) -> list[int]:
        ids = [r.seq.token_ids[r.position] if r.token_id is None else r.token_id for r in self.decode]
        for seg in self.segments:
            ids += seg.seq.token_ids[seg.start : seg.start + seg.num_tokens]
        return ids

    def positions(self) -> list[int]:
        positions = [r.position for r in self.decode]
        for seg in self.segments:
            positions += range(seg.start, seg.start + seg.num_tokens)
        return positions

    def row_of(self) -> dict[tuple[int, int], int]:
        """(seq_id, position) -> its row in the flat batch."""
        rows = {(r.seq.seq_id, r.position): i for i, r in enumerate(self.decode)}
        row = len(self.decode)
        for seg in self.segments:
            rows.update(((seg.seq.seq_id, seg.start + j), row + j) for j in range(seg.num_tokens))
            row += seg.num_tokens
        return rows

    def row_plan(self) -> RowPlan:
        """How the linear layers run these rows with batch invariance (engine/model/invariance.py)."""
        tiles = [RowTile(0, len(self.decode))] if self.decode else []
        row = len(self.decode)
        for seg in self.segments:
            tiles.append(RowTile(row, seg.num_tokens, seg.tile_size, seg.start - seg.tile_start))
            row += seg.num_tokens
        return RowPlan(tiles)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [sum of num_logits over `sampled`, vocab] float32
    sampled: list[Sequence]  # sequences that reached their last token, in logits-row order
    captures: dict[int, CaptureSink]  # seq_id -> what was captured this step
    # Sequences that want prompt logprobs: (seq, first scored prompt position, logits [n, vocab]); row i
    # predicts prompt token `first + i` (computed from the position before it).
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)


class ModelRunner:
    """Turns scheduled sequences into a step and has its `executor` run it: here (`LocalExecutor`), or on
    every tensor-parallel rank (engine/exec/workers.py `TensorParallelExecutor`), where the model is this
    rank's shard (`config` is then the whole model's).

    `batch_invariant` (engine/model/invariance.py): prompt rows in fixed tiles, decode rows through row-count-checked
    kernels and attention per row, so that no row's arithmetic depends on the rest of the step."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, blocks: BlockManager, device: torch.device,
                 config: ModelConfig | None = None, executor: StepExecutor | None = None,
                 batch_invariant: bool = False):
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.device = device
        self.config = config or (model.config if model is not None else None)
        self.executor = executor or LocalExecutor(model, kv_cache)
        self.batch_invariant = batch_invariant

    @property
    def decoder(self) -> CompiledDecoder | None:
        """The compiled decode step (engine/model/compiled.py) the executor runs decode rows through, or None: eager."""
        return self.executor.decoder

    @decoder.setter
    def decoder(self, decoder: CompiledDecoder | None) -> None:
        self.executor.decoder = decoder

    @torch.inference_mode()
    def run(self, work: list[ScheduledSeq]) -> ForwardOutput:
        """One forward pass over all scheduled work; commits the new tokens to each block table.

        The caller (scheduler or session) has reserved the blocks: one reservation per sequence per step."""
        layout = self._layout(work)
        cfg = self.model.config  # under tensor parallelism, this rank's shard: its heads are captured here
        captures = {
            w.seq.seq_id: w.seq.capture.sink(cfg.num_hidden_layers, cfg.num_attention_heads, w.num_logits,
                                             w.seq.num_computed + w.num_tokens, every_head=self.executor.every_head,
                                             chunk_start=w.seq.num_computed)
            for w in work if w.seq.capture is not None
        }
        meta = self._metadata(layout, captures, self.blocks)
        if (tier := self.blocks.window) is not None:  # head-aware eviction: the window heads' pool too
            pool = tier.blocks.kv_cache
            meta.window = WindowAttention(self._metadata(layout, {}, tier.blocks), pool.k, pool.v, tier.splits)
        logit_rows, prompt_parts, sampled = self._logit_rows(work, layout)
        positions = layout.positions()
        step = StepInputs(self._tensor(layout.token_ids()), self._tensor(positions), meta, max(positions),
                          logit_rows, batch_invariant=self.batch_invariant)
        logits, joined = self.executor.execute(step, list(captures.values()))
        captures = dict(zip(captures, joined))
        for w in work:
            self.blocks.commit(w.seq.block_table, w.seq.token_ids, w.seq.num_computed + w.num_tokens,
                               self._shareable(w.seq))
        prompt_logits = [(seq, first, part) for (seq, first), part in zip(prompt_parts, logits)]
        last = logits[-1] if sampled else torch.empty(0, 0, device=self.device)
        return ForwardOutput(last, sampled, captures, prompt_logits)

    def keep_accepted(self, seq: Sequence, num_accepted: int) -> None:
        """After a speculative step: the K/V of the first `num_accepted` draft tokens (now in `seq.token_ids`)
        stay cached; the rest are dropped with the blocks that only they used."""
        num_cached = seq.num_computed + num_accepted
        self.blocks.commit(seq.block_table, seq.token_ids, num_cached, self._shareable(seq))
        self.blocks.truncate(seq.block_table, num_cached)

    def _shareable(self, seq: Sequence) -> int | None:
        """Tokens of `seq` whose cached K/V another request may reuse: with batch invariance only its prompt's,
        which every request computes in the same tiles (its generated tokens were decode rows); else all."""
        return seq.num_prompt_tokens if self.batch_invariant else None

    def _layout(self, work: list[ScheduledSeq]) -> StepLayout:
        """Which positions are decode rows and which prompt segments, in flat-batch order: decode rows first
        (sorted by context length, so that rows of similar length share a batch), then the segments."""
        decode: list[DecodeRow] = []
        segments: list[Segment] = []
        for w in work:
            start, end = w.seq.num_computed, w.seq.num_computed + w.num_tokens
            # With batch invariance a prompt's last token is a tile row even when a chunk leaves it alone.
            if w.is_decode and not (self.batch_invariant and start < w.seq.num_prompt_tokens):
                decode.append(DecodeRow(w.seq, start))
                decode += [DecodeRow(w.seq, end + j, token) for j, token in enumerate(w.draft)]
                continue
            # Batch invariance: the generated tokens of a recomputed (preempted) sequence are decode rows
            # again, as when they were first computed (not with eviction, whose recompute differs anyway).
            split = end
            if self.batch_invariant and w.num_logits == 1 and self._recomputes_as_decode(w.seq):
                split = min(max(start, w.seq.num_prompt_tokens), end)
                decode += [DecodeRow(w.seq, p) for p in range(split, end)]
            if split > start:
                segments += self._segments(w.seq, start, split)
        decode.sort(key=lambda r: self._num_keys(r.seq, r.position + 1, self.blocks))
        return StepLayout(decode, segments)

    def _recomputes_as_decode(self, seq: Sequence) -> bool:
        return seq.kv_policy is None and self.blocks.window is None

    def _segments(self, seq: Sequence, start: int, end: int) -> list[Segment]:
        """Positions [start, end) of `seq` as one prompt segment, or with batch invariance one per tile."""
        if not self.batch_invariant:
            return [Segment(seq, start, end - start)]
        segments = []
        while start < end:
            tile_start, size = prompt_tile(start)
            stop = min(end, tile_start + size)
            segments.append(Segment(seq, start, stop - start, tile_start, size))
            start = stop
        return segments

    def _logit_rows(self, work: list[ScheduledSeq], layout: StepLayout
                    ) -> tuple[list, list[tuple[Sequence, int]], list[Sequence]]:
        """Which rows of the flat batch get logits: first each prompt-logprobs chunk's positions whose next token
        is in the prompt (with the sequence and the first prompt position they score), then one row per
        sampled logit of the sequences that reach their last token."""
        logit_rows, prompt_parts, sampled, sample_rows = [], [], [], []
        row_of = layout.row_of()
        for w in work:
            seq, start = w.seq, w.seq.num_computed
            if seq.prompt_logprobs is not None and seq.computes_whole_prompt:
                n = min(w.num_tokens, seq.num_prompt_tokens - 1 - start)
                if n > 0:  # prompt positions: one segment's rows, or consecutive tiles'
                    first = row_of[seq.seq_id, start]
                    logit_rows.append(slice(first, first + n))
                    prompt_parts.append((seq, start + 1))
            if w.reaches_end:  # and a draft's rows after it
                end = start + w.num_tokens
                sample_rows += [row_of[seq.seq_id, p] for p in range(end - w.num_logits, end + len(w.draft))]
                sampled.append(seq)
        if sample_rows:
            logit_rows.append(sample_rows)
        return logit_rows, prompt_parts, sampled

    def _metadata(self, layout: StepLayout, captures: dict[int, CaptureSink], tier: BlockManager) -> AttentionMetadata:
        """Where the flat batch's K/V go and what each row reads, through `tier`'s blocks (`self.blocks`, or
        with head-aware eviction the window heads' `self.blocks.window.blocks`)."""
        slots = []
        for row in layout.decode:
            slots += tier.slots(self._table(row.seq, tier), row.position, row.position + 1)
        for seg in layout.segments:
            slots += tier.slots(self._table(seg.seq, tier), seg.start, seg.start + seg.num_tokens)
        return AttentionMetadata(
            slot_mapping=self._tensor(slots),
            decode=self._decode_batches(layout.decode, captures, tier),
            prefills=self._prefill_segments(layout, captures, tier),
            row_plan=layout.row_plan() if self.batch_invariant else None,
        )

    def _table(self, seq: Sequence, tier: BlockManager) -> BlockTable:
        return seq.block_table if tier is self.blocks else seq.block_table.window

    def _policy(self, seq: Sequence, tier: BlockManager) -> KVPolicy | None:
        return seq.kv_policy if tier is self.blocks else self.blocks.window.policy

    def _decode_batches(self, decode: list[DecodeRow], captures: dict[int, CaptureSink],
                        tier: BlockManager) -> list[DecodeBatch]:
        """Split the (length-sorted) decode rows into batches that waste little attention on padding (with
        batch invariance their rows share a gather, then attend one by one over their own keys)."""
        batches, start = [], 0
        lens = [self._num_keys(r.seq, r.position + 1, tier) for r in decode]
        for size in group_by_length(lens, DECODE_MAX_PADDING, DECODE_MAX_KEYS):
            batches.append(self._decode_batch(decode[start : start + size], captures, tier))
            start += size
        return batches

    def _decode_batch(self, decode: list[DecodeRow], captures: dict[int, CaptureSink],
                      tier: BlockManager) -> DecodeBatch:
        contexts = [self._context(r.seq, r.position + 1, tier) for r in decode]
        lens = [num_keys for _, num_keys in contexts]
        key_slots = self._key_slots([blocks for blocks, _ in contexts], max(lens))
        mask = None
        if min(lens) != max(lens) and not self.batch_invariant:  # invariant rows attend unpadded, unmasked
            valid = torch.arange(max(lens)).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
            mask = valid.view(len(lens), 1, 1, -1).to(self.device)
        # A sequence's sink takes its last row (a recomputed sequence has several decode rows, one sampled).
        sinks = [captures.get(r.seq.seq_id) if r.position == r.seq.num_tokens - 1 else None for r in decode]
        return DecodeBatch(key_slots, mask, lens, sinks if any(s is not None for s in sinks) else None,
                           self._sink_rotation(decode, lens, tier), per_row=self.batch_invariant)

    def _sink_rotation(self, decode: list[DecodeRow], lens: list[int], tier: BlockManager) -> SinkRotation | None:
        """StreamingLLM positions (engine/cache/kv_policy.py): rows with evicted tokens see their sink keys moved
        forward by the number evicted, so that the sink sits just before the window as in the cache."""
        bs = self.blocks.block_size
        rows, num_sink, shifts = [], [], []
        for i, (row, num_keys) in enumerate(zip(decode, lens)):
            seq, policy = row.seq, self._policy(row.seq, tier)
            if policy is not None and policy.streaming and policy.sink and num_keys < seq.num_tokens:
                rows.append(i)
                num_sink.append(policy.sink_blocks(bs) * bs)
                shifts.append(seq.num_tokens - num_keys)
        if not rows:
            return None
        cos, signed_sin = self.model.rope.lookup(self._tensor(shifts), max(shifts))
        return SinkRotation(rows, num_sink, cos.squeeze(1), signed_sin.squeeze(1))

    def _prefill_segments(self, layout: StepLayout, captures: dict[int, CaptureSink],
                          tier: BlockManager) -> list[PrefillSegment]:
        """Each segment reads every key up to its end: with batch invariance up to its tile's end (the keys
        after its rows are masked by causality), so that its attention has the tile's shape."""
        segments, row = [], len(layout.decode)
        for seg in layout.segments:
            keys_end = seg.tile_start + seg.tile_size if seg.tile_size else seg.start + seg.num_tokens
            blocks, num_keys = self._context(seg.seq, keys_end, tier)
            key_slots = self._key_slots([blocks], num_keys)[0]
            segments.append(PrefillSegment(row, seg.num_tokens, key_slots, captures.get(seg.seq.seq_id),
                                           seg.tile_size, seg.start - seg.tile_start))
            row += seg.num_tokens
        return segments

    def _context(self, seq: Sequence, length: int, tier: BlockManager) -> tuple[list[int], int]:
        """The blocks attention reads for `seq`'s first `length` positions in `tier`, and how many keys they
        hold: all of them, or with a kv_policy the kept ones (evicted blocks are whole blocks before the last
        one, so the kept keys are the kept blocks' slots in order)."""
        blocks = self._table(seq, tier).blocks[: -(-length // self.blocks.block_size)]
        if self._policy(seq, tier) is None:
            return blocks, length
        kept = [b for b in blocks if b != EVICTED]
        return kept, length - (len(blocks) - len(kept)) * self.blocks.block_size

    def _num_keys(self, seq: Sequence, length: int, tier: BlockManager) -> int:
        """Keys the token at position `length - 1` of `seq` attends to in `tier`."""
        return length if self._policy(seq, tier) is None else self._context(seq, length, tier)[1]

    def _key_slots(self, block_lists: list[list[int]], length: int) -> torch.Tensor:
        """`[len(block_lists), length]` cache slots of the first `length` keys through each list of blocks."""
        bs = self.blocks.block_size
        n = -(-length // bs)
        table = torch.tensor([b[:n] + [0] * (n - len(b[:n])) for b in block_lists])
        slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).view(len(block_lists), -1)[:, :length]
        return slots.to(self.device)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device)

    @torch.inference_mode()
    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one sequence, without touching the cache."""
        n = len(token_ids)
        meta = AttentionMetadata(slot_mapping=None, decode=[], prefills=[PrefillSegment(0, n, None)])
        step = StepInputs(self._tensor(token_ids), torch.arange(n, device=self.device), meta, n - 1, [slice(0, n)],
                          use_cache=False)
        return self.executor.execute(step, [])[0][0]

