"""Per-request state: token ids, block table, sampling parameters, status."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from engine.cache.blocks import BlockTable
from engine.cache.kv_policy import KVPolicy
from engine.capture.sink import CaptureState
from engine.core.outputs import TokenLogprob
from engine.sampling.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    capture: CaptureState | None = None  # what it captures, and the capture's state across steps
    block_table: BlockTable = field(default_factory=BlockTable)
    status: SequenceStatus = SequenceStatus.WAITING
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False  # the scheduler has admitted it once (a preempted sequence is admitted again)
    # With params.prompt_logprobs: entry i scores prompt token i (entry 0, which nothing predicts, stays None);
    # filled by position as prompt chunks run, so a chunk that runs again writes the same entries.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    kv_policy: KVPolicy | None = None  # sink + window eviction (engine/cache/kv_policy.py); None: keep every token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_computed(self) -> int:
        """Tokens whose K/V are in the cache."""
        return self.block_table.num_cached_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def computes_whole_prompt(self) -> bool:
        """Every prompt token must run here, none reused from the prefix cache: its prompt's attention
        matrix or its prompt logprobs are still to be computed."""
        if self.output_ids:
            return False
        return self.prompt_logprobs is not None or (self.capture is not None and self.capture.spec.prefill_matrix)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


class SequenceIds:
    """Hands out sequence ids; one per engine, so nothing global."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next(self) -> int:
        return next(self._counter)


@dataclass
class ScheduledSeq:
    """Compute `num_tokens` new tokens of `seq`, starting at its first uncached token."""

    seq: Sequence
    num_tokens: int
    num_logits: int = 1  # trailing positions that need logits (more than 1 when scoring forced tokens)
    # Speculative decoding (engine/sampling/speculative.py): draft tokens after a decode token, computed as decode rows
    # at the positions after it (their K/V are written; those of rejected drafts are dropped afterwards).
    draft: list[int] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.seq.num_computed == self.seq.num_tokens - 1 and self.num_logits == 1

    @property
    def reaches_end(self) -> bool:
        """The chunk ends at the sequence's last token, so it yields next-token logits."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens
