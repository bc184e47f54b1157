"""Per-sequence stop conditions: eos, stop token ids, stop strings, max_tokens and the context limit.

Feed `StopChecker.push` each new token with the text it added (the detokenizer's delta). It returns
the text that is safe to show now and, once the sequence is done, why it finished:

* `"stop"`   - eos (unless `ignore_eos`), one of `stop_token_ids`, or a stop string. The stop
               token's own text and the stop string (and anything after it) are never emitted.
               `stop_reason` is the matched stop string or stop token id (None for eos), as in vLLM.
* `"length"` - `max_tokens` generated tokens, or the context limit reached.

Stop strings may span tokens. Text that could still be the start of a stop string is held back
(at most len(longest stop string) - 1 characters) until the next delta decides it, so streamed text
never shows part of a stop string that then matches. When several stop strings complete in the
same push, the one that starts earliest wins (ties: the shorter, which completed first).

`min_tokens` (vLLM semantics): while fewer than `min_tokens` tokens exist counting the new one,
eos / stop ids / stop strings do not end the sequence; the length limits still do.
`banned_token_ids()` lists the ids the sampler must mask to -inf meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.sampling.params import SamplingParams


class StopChecker:
    """Stop state of one sequence.

    eos_token_ids: the tokenizer's / model's end-of-sequence ids. max_len: the context length
    (prompt + generated tokens may not exceed it); with `prompt_len=0` it is simply a cap on
    generated tokens. The sequence ends with "length" at min(max_tokens, max_len - prompt_len)
    generated tokens; with both None it only ends on a stop condition.
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Iterable[int] = (),
        max_len: int | None = None,
        *,
        prompt_len: int = 0,
    ):
        self.params = params
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.stop_strings: tuple[str, ...] = tuple(params.stop or ())
        self._max_stop = max((len(s) for s in self.stop_strings), default=0)
        limits = []
        if params.max_tokens is not None:
            limits.append(params.max_tokens)
        if max_len is not None:
            limits.append(max_len - prompt_len)
        self.max_new_tokens: int | None = min(limits) if limits else None
        self.num_generated = 0
        self.text = ""  # everything emitted so far
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._held = ""  # text not yet emitted: a suffix that may begin a stop string

    def banned_token_ids(self, num_generated: int | None = None) -> tuple[int, ...]:
        """Ids the next token must not be while under min_tokens (`num_generated` = tokens generated
        so far, default: as counted by `push`): eos (unless ignore_eos) and stop_token_ids."""
        n = self.num_generated if num_generated is None else num_generated
        if n >= self.params.min_tokens:
            return ()
        ids = set(self.stop_token_ids)
        if not self.params.ignore_eos:
            ids |= self.eos_token_ids
        return tuple(sorted(ids))

    def is_stop_token(self, token_id: int) -> bool:
        """Whether `token_id`, as the next token, ends the sequence by itself (eos or a stop token id)."""
        if self.num_generated + 1 < self.params.min_tokens:
            return False
        return token_id in self.stop_token_ids or (not self.params.ignore_eos and token_id in self.eos_token_ids)

    def push(self, token_id: int, text_delta: str = "", num_generated: int | None = None) -> tuple[str, str | None]:
        """Account for one new token. `num_generated`: tokens generated including this one (default:
        counted here). Returns (text to emit now, finish reason or None).

        `text_delta` is the text the token added; for a stop token (see `is_stop_token`), whose own text is
        not output, pass the text still held back before it (the detokenizer's flush)."""
        if self.finished:
            raise RuntimeError(f"push() after the sequence finished ({self.finish_reason})")
        self.num_generated = self.num_generated + 1 if num_generated is None else num_generated
        may_stop = self.num_generated >= self.params.min_tokens

        if may_stop and not self.params.ignore_eos and token_id in self.eos_token_ids:
            return self._finish("stop", None, self._take_held() + text_delta)
        if may_stop and token_id in self.stop_token_ids:
            return self._finish("stop", token_id, self._take_held() + text_delta)

        held = self._held + text_delta
        new_start = len(self._held)  # a fresh match must end inside the new delta
        self._held = held
        if may_stop and self.stop_strings and text_delta:
            match = self._earliest_match(held, new_start)
            if match is not None:
                pos, s = match
                self._held = ""
                return self._finish("stop", s, held[:pos])

        if self.max_new_tokens is not None and self.num_generated >= self.max_new_tokens:
            return self._finish("length", None, self._take_held())

        keep = self._partial_suffix_len(held)
        emit, self._held = held[: len(held) - keep], held[len(held) - keep :]
        self.text += emit
        return emit, None

    def flush(self) -> str:
        """Release held-back text (call when the sequence ends for a reason `push` did not see,
        e.g. an abort). Returns "" when nothing is held (`push` already releases it on finishing)."""
        out = self._take_held()
        self.text += out
        return out

    # ----------------------------------------------------------------------------------------------

    def _take_held(self) -> str:
        out, self._held = self._held, ""
        return out

    def _finish(self, reason: str, stop_reason: str | int | None, emit: str) -> tuple[str, str]:
        self.finished = True
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.text += emit
        return emit, reason

    def _earliest_match(self, text: str, new_start: int) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None
        for s in self.stop_strings:
            pos = text.find(s, max(0, new_start - len(s) + 1))
            if pos >= 0 and (best is None or (pos, len(s)) < best[:2]):
                best = (pos, len(s), s)
        return None if best is None else (best[0], best[2])

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string.

        Per stop string, only suffixes starting at an occurrence of its first character are tried,
        longest first: typically one or two comparisons per string and token, not one per length."""
        window = text[len(text) - min(self._max_stop - 1, len(text)):]
        best = 0
        for s in self.stop_strings:
            start = window.find(s[0], 0, len(window) - best)
            while start >= 0:
                k = len(window) - start
                if k < len(s) and s.startswith(window[start:]):
                    best = k
                    break
                start = window.find(s[0], start + 1, len(window) - best)
        return best
