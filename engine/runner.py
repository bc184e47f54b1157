"""Turns scheduled sequences into one flat batch, runs the model, and returns last-position logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.attention import (AttentionMetadata, DecodeBatch, PrefillSegment, SinkRotation, WindowAttention,
                              group_by_length)
from engine.capture import CaptureSink
from engine.config import ModelConfig
from engine.kv_cache import EVICTED, BlockManager, BlockTable, KVCache
from engine.kv_policy import KVPolicy
from engine.model import LlamaModel
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.parallel.workers import WorkerGroup


# Decode rows are attended in batches of similar length: a batch may carry this many padded key positions
# (each batch costs two cache gathers and one attention call per layer) and this many keys in all (so its
# gathered K/V stay in cache for the attention that reads them). Tuned in docs/PERFORMANCE.md.
DECODE_MAX_PADDING = 256
DECODE_MAX_KEYS = 4096


@dataclass
class ScheduledSeq:
    """Compute `num_tokens` new tokens of `seq`, starting at its first uncached token."""

    seq: Sequence
    num_tokens: int
    num_logits: int = 1  # trailing positions that need logits (more than 1 when scoring forced tokens)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.seq.num_computed == self.seq.num_tokens - 1 and self.num_logits == 1

    @property
    def reaches_end(self) -> bool:
        """The chunk ends at the sequence's last token, so it yields next-token logits."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [sum of num_logits over `sampled`, vocab] float32
    sampled: list[Sequence]  # sequences that reached their last token, in logits-row order
    captures: dict[int, CaptureSink]  # seq_id -> what was captured this step
    # Sequences that want prompt logprobs: (seq, first scored prompt position, logits [n, vocab]); row i
    # predicts prompt token `first + i` (computed from the position before it).
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)


@dataclass
class StepInputs:
    """One forward pass as every tensor-parallel rank runs it (`run_step`): built by rank 0's runner, sent as
    is to the other ranks (engine/parallel/step.py)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    max_position: int
    logit_rows: list[slice | list[int]]  # rows of the hidden states that get logits, one output head call each
    use_cache: bool = True  # False: attention over the new tokens only, the pools untouched (`full_logits`)


def run_step(model: LlamaModel, kv_cache: KVCache, step: StepInputs, sinks: list[CaptureSink]) -> list:
    """The forward pass, the captured rows and the logits of `step.logit_rows` (None on ranks > 0)."""
    pools = (kv_cache.k, kv_cache.v) if step.use_cache else (None, None)
    hidden = model(step.input_ids, step.positions, step.meta, *pools, step.max_position)
    for sink in sinks:
        sink.finish()
    return [model.compute_logits(hidden[rows]) for rows in step.logit_rows]


class ModelRunner:
    """Turns scheduled sequences into a step and runs it: alone, or as rank 0 of tensor-parallel `workers`
    (engine/parallel), whose model is this rank's shard (`config` is then the whole model's)."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, blocks: BlockManager, device: torch.device,
                 config: ModelConfig | None = None, workers: WorkerGroup | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.device = device
        self.config = config or (model.config if model is not None else None)
        self.workers = workers

    @torch.inference_mode()
    def run(self, work: list[ScheduledSeq]) -> ForwardOutput:
        """One forward pass over all scheduled work; commits the new tokens to each block table.

        The caller (scheduler or session) has reserved the blocks: one reservation per sequence per step."""
        # Decode rows sorted by context length, so that rows of similar length share one padded batch.
        decode = sorted((w for w in work if w.is_decode), key=lambda w: self._num_keys(w.seq, self.blocks))
        prefill = [w for w in work if not w.is_decode]
        ordered = decode + prefill  # decode rows lead the flat batch
        ids, positions = [], []
        for w in ordered:
            s, start = w.seq, w.seq.num_computed
            ids += s.token_ids[start : start + w.num_tokens]
            positions += range(start, start + w.num_tokens)
        cfg = self.model.config  # under tensor parallelism, this rank's shard: its heads are captured here
        captures = {
            w.seq.seq_id: w.seq.capture.sink(cfg.num_hidden_layers, cfg.num_attention_heads, w.num_logits,
                                             w.seq.num_computed + w.num_tokens, every_head=self.workers is not None)
            for w in ordered if w.seq.capture is not None
        }
        meta = self._metadata(ordered, decode, prefill, captures, self.blocks)
        if (tier := self.blocks.window) is not None:  # head-aware eviction: the window heads' pool too
            pool = tier.blocks.kv_cache
            meta.window = WindowAttention(self._metadata(ordered, decode, prefill, {}, tier.blocks),
                                          pool.k, pool.v, tier.splits)
        logit_rows, prompt_parts, sampled = self._logit_rows(ordered)
        step = StepInputs(self._tensor(ids), self._tensor(positions), meta, max(positions), logit_rows)
        logits, captures = self._execute(step, captures)
        for w in ordered:
            self.blocks.commit(w.seq.block_table, w.seq.token_ids, w.seq.num_computed + w.num_tokens)
        prompt_logits = [(seq, first, part) for (seq, first), part in zip(prompt_parts, logits)]
        last = logits[-1] if sampled else torch.empty(0, 0, device=self.device)
        return ForwardOutput(last, sampled, captures, prompt_logits)

    def _logit_rows(self, ordered: list[ScheduledSeq]) -> tuple[list, list[tuple[Sequence, int]], list[Sequence]]:
        """Which rows of the flat batch get logits: first each prompt-logprobs chunk's positions whose next token
        is in the prompt (with the sequence and the first prompt position they score), then one row per
        sampled logit of the sequences that reach their last token."""
        logit_rows, prompt_parts, sampled, sample_rows, row = [], [], [], [], 0
        for w in ordered:
            start = w.seq.num_computed
            if w.seq.prompt_logprobs is not None and w.seq.computes_whole_prompt:
                n = min(w.num_tokens, w.seq.num_prompt_tokens - 1 - start)
                if n > 0:
                    logit_rows.append(slice(row, row + n))
                    prompt_parts.append((w.seq, start + 1))
            row += w.num_tokens
            if w.reaches_end:
                sample_rows += range(row - w.num_logits, row)
                sampled.append(w.seq)
        if sample_rows:
            logit_rows.append(sample_rows)
        return logit_rows, prompt_parts, sampled

    def _execute(self, step: StepInputs, captures: dict[int, CaptureSink]) -> tuple[list, dict[int, CaptureSink]]:
        """Run `step` here, or on every tensor-parallel rank: the other ranks get the step first, and the
        captured heads of every rank are joined afterwards (engine/parallel/step.py)."""
        sinks = list(captures.values())
        if self.workers is None:
            return run_step(self.model, self.kv_cache, step, sinks), captures
        from engine.parallel.step import join_captures, send_step

        tp = self.workers.tp
        with self.workers.collective():
            send_step(tp, step, sinks)
            logits = run_step(self.model, self.kv_cache, step, sinks)
            joined = join_captures(tp, sinks, self.config.num_attention_heads)
        return logits, dict(zip(captures, joined))

    def _metadata(self, ordered: list[ScheduledSeq], decode: list[ScheduledSeq], prefill: list[ScheduledSeq],
                  captures: dict[int, CaptureSink], tier: BlockManager) -> AttentionMetadata:
        """Where the flat batch's K/V go and what each row reads, through `tier`'s blocks (`self.blocks`, or
        with head-aware eviction the window heads' `self.blocks.window.blocks`)."""
        slots = []
        for w in ordered:
            start = w.seq.num_computed
            slots += tier.slots(self._table(w.seq, tier), start, start + w.num_tokens)
        return AttentionMetadata(
            slot_mapping=self._tensor(slots),
            decode=self._decode_batches(decode, captures, tier),
            prefills=self._prefill_segments(prefill, len(decode), captures, tier),
        )

    def _table(self, seq: Sequence, tier: BlockManager) -> BlockTable:
        return seq.block_table if tier is self.blocks else seq.block_table.window

    def _policy(self, seq: Sequence, tier: BlockManager) -> KVPolicy | None:
        return seq.kv_policy if tier is self.blocks else self.blocks.window.policy

    def _decode_batches(self, decode: list[ScheduledSeq], captures: dict[int, CaptureSink],
                        tier: BlockManager) -> list[DecodeBatch]:
        """Split the (length-sorted) decode rows into batches that waste little attention on padding."""
        batches, start = [], 0
        lens = [self._num_keys(w.seq, tier) for w in decode]
        for size in group_by_length(lens, DECODE_MAX_PADDING, DECODE_MAX_KEYS):
            batches.append(self._decode_batch(decode[start : start + size], captures, tier))
            start += size
        return batches

    def _decode_batch(self, decode: list[ScheduledSeq], captures: dict[int, CaptureSink],
                      tier: BlockManager) -> DecodeBatch:
        contexts = [self._context(w.seq, w.seq.num_tokens, tier) for w in decode]
        lens = [num_keys for _, num_keys in contexts]
        key_slots = self._key_slots([blocks for blocks, _ in contexts], max(lens))
        mask = None
        if min(lens) != max(lens):
            valid = torch.arange(max(lens)).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
            mask = valid.view(len(lens), 1, 1, -1).to(self.device)
        sinks = [captures.get(w.seq.seq_id) for w in decode]
        return DecodeBatch(key_slots, mask, lens, sinks if any(s is not None for s in sinks) else None,
                           self._sink_rotation([w.seq for w in decode], lens, tier))

    def _sink_rotation(self, seqs: list[Sequence], lens: list[int], tier: BlockManager) -> SinkRotation | None:
        """StreamingLLM positions (engine/kv_policy.py): rows with evicted tokens see their sink keys moved
        forward by the number evicted, so that the sink sits just before the window as in the cache."""
        bs = self.blocks.block_size
        rows, num_sink, shifts = [], [], []
        for i, (seq, num_keys) in enumerate(zip(seqs, lens)):
            policy = self._policy(seq, tier)
            if policy is not None and policy.streaming and policy.sink and num_keys < seq.num_tokens:
                rows.append(i)
                num_sink.append(policy.sink_blocks(bs) * bs)
                shifts.append(seq.num_tokens - num_keys)
        if not rows:
            return None
        cos, signed_sin = self.model.rope.lookup(self._tensor(shifts), max(shifts))
        return SinkRotation(rows, num_sink, cos.squeeze(1), signed_sin.squeeze(1))

    def _prefill_segments(
        self, prefill: list[ScheduledSeq], start: int, captures: dict[int, CaptureSink], tier: BlockManager
    ) -> list[PrefillSegment]:
        segments = []
        for w in prefill:
            blocks, num_keys = self._context(w.seq, w.seq.num_computed + w.num_tokens, tier)
            key_slots = self._key_slots([blocks], num_keys)[0]
            segments.append(PrefillSegment(start, w.num_tokens, key_slots, captures.get(w.seq.seq_id)))
            start += w.num_tokens
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

    def _num_keys(self, seq: Sequence, tier: BlockManager) -> int:
        """Keys the newest token of `seq` attends to in `tier`."""
        return seq.num_tokens if self._policy(seq, tier) is None else self._context(seq, seq.num_tokens, tier)[1]

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
        return self._execute(step, {})[0][0]

