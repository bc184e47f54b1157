"""Speculative decoding without a draft model: n-gram (prompt lookup) drafts, verified in one forward pass.

A decoding sequence whose last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) occurred
earlier in its own prompt or output drafts the k tokens that followed that occurrence, as vLLM's
`method: "ngram"`, llama.cpp's `--spec-type ngram-*` and transformers' `prompt_lookup_num_tokens` do. The step
then computes k + 1 decode rows of the sequence (its last token and the k drafts, each at its own position,
each attending to the keys before it, causal within the chunk) and samples them in order (engine/api/engine.py):

* row j's token is drawn from row j's distribution exactly as plain decoding would draw it (same processing,
  same per-request generator, penalties and min_tokens counted as if the drafts before it were generated);
* the draft at row j is accepted when the drawn token equals it; the first token that differs is kept and ends
  the step (when every draft is accepted, row k's token is a bonus token).

For a one-hot draft this is the standard rejection rule (accept x with probability p(x), else draw from p with
x removed), so sampling keeps the target distribution; and because each emitted token is drawn from the same
logits with the same generator state as without speculation, a greedy or seeded request gives *the same
tokens* with and without it, as long as k + 1 rows of one sequence give the logits one row at a time would:
the batch-invariance rule (engine/model/invariance.py), under which decode rows go through row-count-checked kernels
and attend one by one. The K/V of rejected drafts are dropped: the cache is rolled back to the last accepted
token and the blocks past it are released (`ModelRunner.keep_accepted`).

Back-off: a draft that is rejected outright halves the sequence's next draft length, down to a pause of
`BACKOFF_PAUSE` steps without drafts; a draft accepted whole doubles it again, up to k. Open-ended text that
rarely repeats itself therefore pays for few draft rows.

Not speculated (decoded one token per step, as without speculation): requests with structured output (the
grammar would have to roll back), attention capture, a kv_policy or head-aware eviction (their keys are not
all positions), `SamplingParams(speculative=False)`, and `Session` stepping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPECULATIVE_METHODS = ("ngram",)
MAX_SPECULATIVE_TOKENS = 32
BACKOFF_PAUSE = 8  # steps without drafts after the draft length has backed off to nothing


@dataclass(frozen=True)
class SpeculativeConfig:
    """`method`: "ngram" (prompt lookup). `num_speculative_tokens`: the most draft tokens per step (k).
    `prompt_lookup_max` / `prompt_lookup_min`: the longest and shortest suffix looked up (vLLM's names)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 3  # 2-token suffixes match often in open text, and mostly draft wrongly

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SPECULATIVE_TOKENS:
                raise ValueError(f"{name} must be a whole number in [1, {MAX_SPECULATIVE_TOKENS}], got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")

    @classmethod
    def coerce(cls, method: str | SpeculativeConfig | None, num_speculative_tokens: int | None = None
               ) -> SpeculativeConfig | None:
        """`LLM(speculative="ngram", num_speculative_tokens=k)` as a config (None: no speculation)."""
        if method is None:
            if num_speculative_tokens is not None:
                raise ValueError("num_speculative_tokens needs speculative='ngram'")
            return None
        if isinstance(method, cls):
            return method
        if num_speculative_tokens is None:
            return cls(method)
        return cls(method, num_speculative_tokens)

    def describe(self) -> str:
        return (f"{self.method}, {self.num_speculative_tokens} draft tokens, "
                f"suffix {self.prompt_lookup_min}-{self.prompt_lookup_max} tokens")


@dataclass
class NgramIndex:
    """Where each n-gram of one sequence last ended, for n in [n_min, n_max]; grows as tokens are appended.

    Positions up to the second-to-last token are indexed, so that looking up the sequence's own suffix finds
    an earlier occurrence, never itself."""

    n_min: int
    n_max: int
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> position of its last token
    num_indexed: int = 0  # positions < num_indexed are in `last_end`

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        self._index(token_ids, len(token_ids) - 1)
        n_tokens = len(token_ids)
        for n in range(min(self.n_max, n_tokens - 1), self.n_min - 1, -1):
            end = self.last_end.get(tuple(token_ids[n_tokens - n :]))
            if end is not None:
                return token_ids[end + 1 : min(end + 1 + k, n_tokens)]
        return []

    def _index(self, token_ids: list[int], upto: int) -> None:
        for end in range(self.num_indexed, upto):
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                self.last_end[tuple(token_ids[end - n + 1 : end + 1])] = end
        self.num_indexed = max(self.num_indexed, upto)


@dataclass
class DraftState:
    """One request's speculation: its n-gram index, its current draft length (the back-off), and counts."""

    index: NgramIndex
    max_tokens: int
    num_tokens: int = 0  # current draft length; 0 while paused
    pause: int = 0  # steps left without drafts
    num_drafted: int = 0
    num_accepted: int = 0

    @classmethod
    def start(cls, config: SpeculativeConfig) -> DraftState:
        k = config.num_speculative_tokens
        return cls(NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max), k, num_tokens=k)

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """The draft for the next step: at most `limit` tokens (what budget, blocks and max_tokens leave)."""
        if self.pause:
            self.pause -= 1
            if self.pause == 0:
                self.num_tokens = 1
            return []
        k = min(self.num_tokens, limit)
        return self.index.propose(token_ids, k) if k > 0 else []

    def record(self, drafted: int, accepted: int) -> None:
        """Count a verified draft and move the draft length: halve on a full reject, double on a full accept."""
        self.num_drafted += drafted
        self.num_accepted += accepted
        if accepted == 0:
            self.num_tokens //= 2
            if self.num_tokens == 0:
                self.pause = BACKOFF_PAUSE
        elif accepted == drafted:
            self.num_tokens = min(self.max_tokens, max(1, self.num_tokens) * 2)
