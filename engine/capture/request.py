"""What a request asks to see of attention: `AttentionCapture` (layers, heads, top-k, spans of the prompt,
head statistics, extras), checked against the model and the prompt when the request is added, and `Span` /
`char_spans` (named runs of prompt tokens, from token positions or character ranges). engine/capture/sink.py
collects what it asks for during each step.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.checks import check_int
from engine.core.errors import RequestError


@dataclass(frozen=True)
class Span:
    """A named run of prompt token positions, `start` inclusive, `end` exclusive."""

    name: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RequestError("attention.spans", f"a span needs a non-empty name, got {self.name!r}")
        check_int(f"attention.spans[{self.name}].start", self.start, 0)
        check_int(f"attention.spans[{self.name}].end", self.end, self.start + 1)


@dataclass(frozen=True)
class AttentionCapture:
    """Which attention to capture and in what form.

    layers/heads: indices (None = all). top_k: also the k largest entries of each row. spans: the mass on
    each span of the prompt, on the generated tokens and on the rest of the prompt. rows: hand out the full
    rows (default: unless top_k or spans is given). head_stats: accumulate every captured head's pattern
    scores over the request. prefill_matrix: the prompt's whole matrix on the first step. scores: the
    pre-softmax scores q.k/sqrt(d) of the captured rows. value_norms: ||p_j v_j W_O|| per key and head.
    head_stats_every: with head_stats, also a copy of the statistics so far every n generated tokens
    (`RequestOutput.head_stats_snapshot`), safe to read on another thread while the request goes on.
    """

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    top_k: int | None = None
    prefill_matrix: bool = False
    spans: tuple[Span, ...] | None = None
    rows: bool | None = None
    head_stats: bool = False
    scores: bool = False
    value_norms: bool = False
    head_stats_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
                    raise RequestError(f"attention.{name}", f"attention.{name} must be a non-empty list of "
                                                            f"indices >= 0 (omit it for all), got {list(value)}")
                if len(set(value)) != len(value):
                    raise RequestError(f"attention.{name}", f"attention.{name} has duplicates: {list(value)}")
                object.__setattr__(self, name, value)
        check_int("attention.top_k", self.top_k, 1, allow_none=True)
        check_int("attention.head_stats_every", self.head_stats_every, 1, allow_none=True)
        if self.head_stats_every is not None and not self.head_stats:
            raise RequestError("attention.head_stats_every", "head_stats_every needs head_stats")
        if self.spans is not None:
            object.__setattr__(self, "spans", _check_spans(self.spans))

    @property
    def full_rows(self) -> bool:
        return self.rows if self.rows is not None else (self.top_k is None and self.spans is None)

    def validate(self, num_layers: int, num_heads: int, num_prompt_tokens: int | None = None) -> None:
        """The layers and heads exist in a model of this shape, and the spans lie in the prompt."""
        for name, values, count in (("layers", self.layers, num_layers), ("heads", self.heads, num_heads)):
            bad = [v for v in values or () if v >= count]
            if bad:
                raise RequestError(f"attention.{name}", f"attention.{name} {bad} out of range: the model has "
                                                        f"{count} {name}")
        if num_prompt_tokens is not None:
            for s in self.spans or ():
                if s.end > num_prompt_tokens:
                    raise RequestError("attention.spans", f"span {s.name!r} [{s.start}, {s.end}) reaches past the "
                                                          f"prompt's {num_prompt_tokens} tokens")


def _check_spans(spans) -> tuple[Span, ...]:
    spans = tuple(s if isinstance(s, Span) else Span(**s) if isinstance(s, dict) else Span(*s) for s in spans)
    if not spans:
        raise RequestError("attention.spans", "attention.spans must name at least one span (omit it for none)")
    names = [s.name for s in spans]
    if len(set(names)) != len(names):
        raise RequestError("attention.spans", f"attention.spans has duplicate names: {names}")
    ordered = sorted(spans, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:  # overlapping spans would count a key twice: each row must still sum to 1
            raise RequestError("attention.spans", f"spans {a.name!r} [{a.start}, {a.end}) and {b.name!r} "
                                                  f"[{b.start}, {b.end}) overlap")
    return spans


def char_spans(tokenizer, text: str, ranges: dict[str, tuple[int, int]],
               add_special_tokens: bool = True) -> tuple[list[int], tuple[Span, ...]]:
    """Tokenize `text` and turn character ranges (`name -> (start, end)`, end exclusive) into token spans:
    every token whose characters overlap the range. Returns the prompt's token ids and the spans."""
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    starts, ends = token_char_offsets(tokenizer, ids, text)
    return ids, _check_spans([char_span(name, start, end, starts, ends) for name, (start, end) in ranges.items()])


def char_span(name: str, start: int, end: int, token_starts: list[int], token_ends: list[int]) -> Span:
    """The span of the tokens whose characters overlap `[start, end)` (offsets from `token_char_offsets`)."""
    length = token_ends[-1] if token_ends else 0
    if not 0 <= start < end <= length:
        raise RequestError("attention.spans", f"character range {name!r} [{start}, {end}) is not inside the "
                                              f"{length}-character prompt")
    hit = [i for i, (a, b) in enumerate(zip(token_starts, token_ends)) if a < end and b > start]
    if not hit:
        raise RequestError("attention.spans", f"character range {name!r} [{start}, {end}) covers no token")
    return Span(name, hit[0], hit[-1] + 1)


def token_char_offsets(tokenizer, ids: list[int], text: str) -> tuple[list[int], list[int]]:
    """Each token's `[start, end)` in `text`, from decoding the ids one at a time (special tokens such as BOS
    that the text does not hold get an empty range). Raises if the ids do not decode back to `text`."""
    from engine.text.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    special = set(tokenizer.special_token_ids)
    starts, ends, pos, decoded = [], [], 0, []
    for i, t in enumerate(ids):
        delta = "" if t in special else detok.add(t)
        if i == len(ids) - 1:
            delta += detok.flush()
        # Text held back (a character split over byte tokens) is credited to the token that completes it.
        starts.append(pos)
        pos += len(delta)
        ends.append(pos)
        decoded.append(delta)
    if "".join(decoded) != text:
        raise RequestError("attention.spans", "character ranges need a prompt whose tokens decode back to the same "
                                              "text; give token positions instead")
    return starts, ends
