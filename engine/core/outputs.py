"""What the engine hands back: per-token logprobs, captured attention rows, request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top-n alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TopKAttention:
    """The k largest probabilities of each head's row, their key positions and the mass left over."""

    positions: np.ndarray  # [heads, k] absolute key positions
    probs: np.ndarray  # [heads, k]
    leftover: np.ndarray  # [heads] 1 - sum(probs)


@dataclass
class SpanMasses:
    """Attention mass on named spans of the prompt: per captured layer `[heads, S + 2]`, each row the mass on
    each span in order, then on the tokens generated so far, then on the rest of the prompt (sums to 1)."""

    names: tuple[str, ...]
    layers: dict[int, np.ndarray]

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.names, "generated", "rest_of_prompt")

    def head_mean(self) -> dict[int, np.ndarray]:
        """Per layer, `[S + 2]` averaged over the captured heads."""
        return {layer: m.mean(axis=0) for layer, m in self.layers.items()}


@dataclass
class AttentionRows:
    """Where one query token attended: per captured layer, `[heads, context_len]` softmax rows."""

    query_position: int  # absolute position of the query token
    heads: tuple[int, ...]  # which query heads the rows are, in order
    layers: dict[int, np.ndarray]  # layer -> [heads, context_len] float32 (empty when full rows were not asked)
    # With AttentionCapture(prefill_matrix=True), on the first step (and on a session's fed chunk):
    # layer -> [heads, queries, context_len] for every query of that pass, causal (zeros above the diagonal).
    prefill: dict[int, np.ndarray] | None = None
    # With AttentionCapture(top_k=k): the k largest entries of each row (reduced on the device).
    top: dict[int, TopKAttention] | None = None
    spans: SpanMasses | None = None  # with AttentionCapture(spans=...)
    scores: dict[int, np.ndarray] | None = None  # with scores=True: pre-softmax q.k/sqrt(d), -inf past the query
    value_norms: dict[int, np.ndarray] | None = None  # with value_norms=True: p_j * ||v_j W_O^h||

    @property
    def key_positions(self) -> np.ndarray:
        """Absolute positions of the keys the rows cover (0 .. query_position)."""
        return np.arange(self.query_position + 1)

    def top_k(self, k: int) -> dict[int, TopKAttention]:
        out = {}
        for layer, rows in self.layers.items():
            k_eff = min(k, rows.shape[1])
            idx = np.argsort(-rows, axis=1, kind="stable")[:, :k_eff]
            probs = np.take_along_axis(rows, idx, axis=1)
            out[layer] = TopKAttention(idx, probs, np.clip(1.0 - probs.sum(axis=1), 0.0, 1.0))
        return out


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far plus what this step added.

    Building one costs the same at any length: `prompt_token_ids` is the request's own list (read it,
    do not change it), and `token_ids` is sliced from the sequence only when it is read."""

    request_id: str
    prompt_token_ids: list[int]
    num_output_tokens: int = 0  # generated tokens so far (len(token_ids), without building the list)
    text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None  # all so far, when asked
    new_logprobs: list[TokenLogprob] | None = None
    attention: list[AttentionRows] | None = None  # this step's rows, when captured
    num_cached_prompt_tokens: int = 0  # prompt tokens reused from the prefix cache
    all_token_ids: list[int] = field(default_factory=list, repr=False)  # the sequence's list (prompt + output)
    error: str | None = None  # with finish_reason "error": what failed (the request alone was ended)
    # With AttentionCapture(head_stats=True): engine.capture.head_stats.HeadStats over every captured row so far
    # (the same object on every output of the request; label it with engine.capture.head_labels.label_heads).
    head_stats: object | None = field(default=None, repr=False)
    # With AttentionCapture(head_stats_every=n): a copy of head_stats on every n-th generated token (the live
    # object above changes as the request goes on; this one does not).
    head_stats_snapshot: object | None = field(default=None, repr=False)
    # With SamplingParams(prompt_logprobs=n): one entry per prompt token, the first None (nothing predicts it);
    # complete from the request's first output on.
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, repr=False)
    # Speculative decoding (engine/sampling/speculative.py): draft tokens verified for this request so far, and how many
    # of them were accepted (each accepted one saved a step).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        """Every token generated so far (a new list on each read)."""
        start = len(self.prompt_token_ids)
        return self.all_token_ids[start : start + self.num_output_tokens]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
