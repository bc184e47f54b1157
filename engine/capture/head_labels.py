"""Head labels from `HeadStats` (engine/capture/head_stats.py, whose docstring defines every score): each rule of
`head_labels` that holds, in the priority order of `LABELS`; the first is the primary label, the next (if any
besides diffuse/mixed) the secondary. docs/ATTENTION.md explains them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from engine.capture.head_stats import HeadStats


@dataclass(frozen=True)
class Thresholds:
    """When a head earns a label (see `label_heads` and docs/ATTENTION.md)."""

    pattern: float = 0.4  # mass scores (induction, duplicate, self, long_range, syntax, global, local)
    diffuse: float = 0.7  # normalised entropy at or above it: "diffuse"; long-range and syntax need less
    argmax: float = 0.5  # row fractions (copying, positional): the strongest key does it in most rows
    min_rows: int = 5  # eligible rows that induction, duplicate and copying need before they can label

    def __post_init__(self) -> None:
        if not 0 < self.pattern <= 1 or not 0 < self.diffuse <= 1 or not 0 < self.argmax <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {self}")
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows}")


@dataclass(frozen=True)
class HeadLabel:
    layer: int
    head: int
    label: str  # the primary label
    score: float  # the score the primary label rests on (normalised entropy for diffuse/mixed)
    scores: dict[str, float]
    secondary: str | None = None
    detail: dict = field(default_factory=dict)  # HeadStats.details(): offset, global columns, row counts


# label -> the score it rests on
LABEL_SCORE = {
    "induction": "induction", "copying": "copying", "duplicate": "duplicate", "previous-token": "positional",
    "positional": "positional", "self": "self", "long-range": "long_range", "syntax": "syntax",
    "sink": "global", "local": "local", "diffuse": "entropy", "mixed": "entropy",
}


def head_labels(scores: Mapping[str, float], detail: Mapping, t: Thresholds = Thresholds(),
                window: int = 4) -> list[str]:
    """Every label whose rule holds for one head, in priority (LABELS) order; the last is diffuse or mixed.

    induction       induction >= pattern, over >= min_rows eligible rows
    copying         copying >= argmax, over >= min_rows eligible rows
    duplicate       duplicate >= pattern, over >= min_rows eligible rows
    previous-token  positional >= argmax at offset 1
    positional      positional >= argmax at an offset 2..max_offset
    self            self >= pattern
    syntax          syntax >= pattern and entropy < diffuse
    sink            global >= pattern
    local           local >= pattern and entropy < diffuse, unless self, previous-token or positional at an
                    offset < window holds (those already put their mass inside the window)
    long-range      long_range >= pattern and entropy < diffuse
    diffuse         entropy >= diffuse;  mixed otherwise (concentrated, on no single pattern)

    The mass rules of syntax, local and long-range need a concentrated head: a uniform head's mass on
    separators, recent keys or far keys is just their share of the keys (on a 20-token run, half of a
    uniform head's attention falls in the last 4 keys).
    """
    s, out = scores, []
    enough = detail.get("induction_rows", 0) >= t.min_rows
    if enough and s["induction"] >= t.pattern:
        out.append("induction")
    if detail.get("copying_rows", 0) >= t.min_rows and s["copying"] >= t.argmax:
        out.append("copying")
    if enough and s["duplicate"] >= t.pattern:
        out.append("duplicate")
    offset = int(detail.get("offset", 0))
    if s["positional"] >= t.argmax:
        out.append("previous-token" if offset == 1 else "positional")
    if s["self"] >= t.pattern:
        out.append("self")
    concentrated = s["entropy"] < t.diffuse
    if s["syntax"] >= t.pattern and concentrated:
        out.append("syntax")
    if s["global"] >= t.pattern:
        out.append("sink")
    near = "self" in out or "previous-token" in out or ("positional" in out and offset < window)
    if s["local"] >= t.pattern and concentrated and not near:
        out.append("local")
    if s["long_range"] >= t.pattern and concentrated:
        out.append("long-range")
    out.append("diffuse" if s["entropy"] >= t.diffuse else "mixed")
    return out


def label_heads(stats: HeadStats, thresholds: Thresholds = Thresholds()) -> list[HeadLabel]:
    """A primary (and, where a second rule holds, secondary) label for every captured head, layer-major."""
    scores = stats.scores()
    details = iter(stats._details_all())
    out = []
    for li, layer in enumerate(stats.layers):
        for hi, head in enumerate(stats.heads):
            s = {name: float(v[li, hi]) for name, v in scores.items()}
            detail = next(details)
            names = head_labels(s, detail, thresholds, stats.window)
            primary = names[0]
            secondary = names[1] if len(names) > 1 and names[1] not in ("diffuse", "mixed") else None
            out.append(HeadLabel(layer, head, primary, s[LABEL_SCORE[primary]], s, secondary, detail))
    return out


def top_heads(stats: HeadStats, name: str, n: int = 5) -> list[tuple[int, int, float]]:
    """The `n` heads with the highest `name` score: (layer, head, score), best first (ties: lower layer/head)."""
    values = stats.scores()[name]
    order = np.argsort(-values, axis=None, kind="stable")[:n]
    return [
        (stats.layers[i // len(stats.heads)], stats.heads[i % len(stats.heads)], float(values.flat[i])) for i in order
    ]
