"""Step-by-step decoding of one sequence: sample or force one token at a time and look at each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.capture.sink import CaptureState
from engine.core.checks import check_length, check_token_ids
from engine.core.errors import RequestError
from engine.core.outputs import AttentionRows, TokenLogprob
from engine.exec.runner import ModelRunner
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import Sampler, make_generator, score_tokens
from engine.sched.sequence import ScheduledSeq, Sequence, SequenceIds
from engine.text.tokenizer import IncrementalDetokenizer, Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


def _unconstrained(params: SamplingParams) -> SamplingParams:
    # A session's caller picks or forces every token: a grammar would be bypassed, so it is refused, not ignored.
    if params.structured_output is not None:
        raise RequestError("structured_output", "a Session does not apply structured_output; use LLM.generate")
    return params


@dataclass
class Step:
    """One decoding step: the token chosen (or forced) and what the model saw to choose it."""

    token_id: int
    text: str  # the text this token added
    logits: torch.Tensor  # float32 [vocab]: the distribution the token came from
    logprobs: TokenLogprob  # the token's log-probability (with top-n when params.logprobs is set)
    attention: AttentionRows | None  # the query row that produced `logits`, per captured layer
    position: int  # absolute position of the new token


class Session:
    """A sequence in the shared paged cache, advanced by the caller.

    The last token is always uncomputed: each `step` runs it (one query row per head against the cached
    keys), samples the next token, and appends it. `feed` forces tokens instead of sampling them. Close
    the session (or use it as a context manager) to return its blocks.

    With `params.kv_policy` (engine/cache/kv_policy.py) it evicts as the engine does, before each run, for the
    window of the run's first token: step, or feed one token at a time, for exact windows. It cannot rewind
    once it has evicted.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        seq_ids: SequenceIds,
        token_ids: list[int],
        max_model_len: int,
        capture: CaptureState | None = None,
        params: SamplingParams | None = None,
    ):
        self.runner = runner
        self.blocks = runner.blocks
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.params = _unconstrained(params or GREEDY)
        self._seq_ids = seq_ids
        self.seq = Sequence(seq_ids.next(), list(token_ids), len(token_ids), self.params, capture,
                            kv_policy=self.params.kv_policy)
        self.seq.generator = make_generator(self.params.seed, runner.device)
        self.sampler = Sampler(self.params.seed)
        self._detok = self._new_detokenizer()
        self.closed = False
        self.attention_log: list[AttentionRows] = []  # every step's rows while capturing

    @property
    def token_ids(self) -> list[int]:
        return list(self.seq.token_ids)

    @property
    def head_stats(self):
        """engine.capture.head_stats.HeadStats over every captured row, with AttentionCapture(head_stats=True)."""
        return self.seq.capture.head_stats if self.seq.capture is not None else None

    @property
    def text(self) -> str:
        """Decoded text of everything after the prompt."""
        return self.tokenizer.decode(self.seq.output_ids)

    def step(self, params: SamplingParams | None = None) -> Step:
        """Run the pending token(s), sample the next token, append it."""
        self._check_open(1)
        params = _unconstrained(params or self.params)
        logits, sink = self._run([], num_logits=1)
        token, logprob = self._sample(logits, params)
        self.seq.token_ids.append(token)
        [attention] = self._attention(sink, [self.seq.num_tokens - 2])
        return self._make_step(token, logits[0], logprob, attention)

    def feed(self, token_ids: list[int]) -> list[Step]:
        """Append forced tokens, scoring each one: a `Step` per token, as if it had been sampled.

        All of them run in one forward pass (a prefill chunk), not one pass per token.
        """
        token_ids = check_token_ids("token_ids", token_ids, self.runner.config.vocab_size)
        if not token_ids:
            return []
        self._check_open(len(token_ids))
        logits, sink = self._run(token_ids[:-1], num_logits=len(token_ids))
        self.seq.token_ids.append(token_ids[-1])
        first = self.seq.num_tokens - len(token_ids)
        attention = self._attention(sink, range(first - 1, first - 1 + len(token_ids)))
        logprobs = score_tokens(logits, token_ids, self.params.logprobs)
        return [self._make_step(token, logits[i], logprobs[i], attention[i], position=first + i)
                for i, token in enumerate(token_ids)]

    def fork(self) -> "Session":
        """A copy that shares every cached block; the first write to a shared block copies it."""
        self._check_open(0)
        child = Session.__new__(Session)
        # Shared with the parent: the engine's runner, pool, tokenizer and sequence ids, the parameters, and the
        # sampler (unseeded draws go on from one stream). Its own: the sequence (its blocks shared copy-on-write),
        # the detokenizer, the attention log.
        child.runner, child.blocks, child.tokenizer = self.runner, self.blocks, self.tokenizer
        child._seq_ids = self._seq_ids
        child.max_model_len, child.params, child.sampler = self.max_model_len, self.params, self.sampler
        child.closed = False
        capture = self.seq.capture.fork() if self.seq.capture is not None else None
        child.seq = Sequence(
            self._seq_ids.next(), list(self.seq.token_ids), self.seq.num_prompt_tokens, self.params, capture,
            kv_policy=self.seq.kv_policy,
        )
        child.seq.block_table = self.blocks.fork(self.seq.block_table)
        if self.seq.generator is not None:
            child.seq.generator = torch.Generator(self.runner.device).set_state(self.seq.generator.get_state())
        child._detok = child._new_detokenizer()
        child.attention_log = list(self.attention_log)
        return child

    def rewind(self, n: int) -> None:
        """Drop the last `n` tokens and their cache slots (at least one token must remain)."""
        self._check_open(0)
        if not 0 <= n < self.seq.num_tokens:
            raise ValueError(f"can rewind 0..{self.seq.num_tokens - 1} tokens, got {n}")
        if n and self.seq.block_table.has_evicted:
            raise ValueError("cannot rewind a session whose kv_policy has evicted tokens")
        del self.seq.token_ids[self.seq.num_tokens - n :]
        self.seq.num_prompt_tokens = min(self.seq.num_prompt_tokens, self.seq.num_tokens)
        # Keep the invariant that the last token is uncomputed, so the next step has a query to run.
        self.blocks.truncate(self.seq.block_table, min(self.seq.num_computed, self.seq.num_tokens - 1))
        if self.seq.capture is not None:
            self.seq.capture.rewind(self.seq.num_tokens)
        self._detok = self._new_detokenizer()

    def close(self) -> None:
        """Return every block to the pool (idempotent)."""
        if not self.closed:
            self.blocks.release(self.seq.block_table)
            self.closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- internals ---------------------------------------------------------------------------------
    def _check_open(self, new_tokens: int) -> None:
        if self.closed:
            raise RuntimeError("session is closed")
        check_length("token_ids", self.seq.num_tokens + new_tokens, self.max_model_len, "the session")

    def _run(self, extra: list[int], num_logits: int):
        """Append `extra`, compute every uncomputed token; logits of the last `num_logits` positions."""
        seq = self.seq
        seq.token_ids += extra
        try:
            if seq.num_computed >= seq.num_prompt_tokens:
                # The window of the first token computed now; a chunk's later tokens see a little more.
                if seq.kv_policy is not None:
                    self.blocks.evict(seq.block_table, seq.kv_policy, seq.num_computed + 1)
                self.blocks.evict_window(seq.block_table, seq.num_computed + 1)
            self.runner.blocks.reserve(seq.block_table, seq.num_tokens)
            out = self.runner.run([ScheduledSeq(seq, seq.num_tokens - seq.num_computed, num_logits)])
        except BaseException:
            del seq.token_ids[len(seq.token_ids) - len(extra) :]
            raise
        return out.logits, out.captures.get(seq.seq_id)

    def _sample(self, logits: torch.Tensor, params: SamplingParams) -> tuple[int, TokenLogprob]:
        seq = self.seq
        gen = seq.generator if params.seed == self.params.seed else make_generator(params.seed, self.runner.device)
        out = self.sampler.sample(
            logits, [params], [gen], [seq.token_ids[: seq.num_prompt_tokens]], [seq.output_ids]
        )
        token = int(out.token_ids[0])
        return token, score_tokens(logits[:1], [token], params.logprobs)[0]

    def _attention(self, sink, queries) -> list[AttentionRows | None]:
        """The captured rows of these queries (their tokens are in the sequence now), statistics updated."""
        if sink is None:
            return [None] * len(queries)
        rows = self.seq.capture.rows(sink, list(queries))
        self.seq.capture.update_stats(sink, list(queries), self.seq.token_ids)
        self.attention_log += rows
        return rows

    def _make_step(self, token, logits, logprob, attention, position: int | None = None) -> Step:
        position = self.seq.num_tokens - 1 if position is None else position
        return Step(token, self._detok.add(token), logits, logprob, attention, position)

    def _new_detokenizer(self) -> IncrementalDetokenizer:
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=False)
        for t in self.seq.output_ids:
            detok.add(t)
        return detok

