"""The HTML report: one self-contained file (inline CSS, JS and SVG; no network) for a dump.

* a layer x head grid coloured by label (primary label in the cell, the secondary one beside it and as a
  strip along the cell's foot), with a legend of every label; or coloured by any score, with a colour scale;
* the chosen head's attention matrix rebuilt from the step rows, drawn on canvases with key and query labels
  that stay readable at any length (every n-th label, truncated, full text on hover; a minimum cell size and
  a scrolling box whose label rows stay in view);
* a per-step view: what the query that produced each token looked at;
* a span view, when the dump's `info["spans"]` names spans of the prompt: per step, the attention mass on
  each span, on the tokens generated so far and on the rest of the prompt (plus "unknown", the part of a
  top-k row that was not stored), for the chosen layer averaged over heads and for the chosen head.

The static parts (grid, legend, tables) are plain SVG/HTML and need no script; the script adds the heatmap,
the hover details, the step and span views. Matrices travel as base64 bytes on a square-root scale (byte b
means p = (b / 255)^2), so small probabilities keep some resolution; span masses as base64 uint16 (p * 65535).
The page reads its URL fragment, e.g. `report.html#colour=induction&head=18,6&step=40&zoom=8`.
"""

from __future__ import annotations

import base64
import colorsys
import dataclasses
import hashlib
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.capture.head_labels import Thresholds, label_heads, top_heads
from engine.capture.head_stats import LABELS
from engine.capture.head_stats import SCORE_TITLES as STATS_SCORE_TITLES
from engine.inspect.dump import AttentionDump

# Fixed colours for the labels we know; any other label gets one from its name (`label_colour`).
LABEL_COLOURS = {
    "induction": "#d62728",
    "copying": "#e377c2",
    "previous-token": "#1f77b4",
    "positional": "#6baed6",
    "duplicate": "#ff7f0e",
    "syntax": "#2ca02c",
    "global": "#8c564b",
    "long-range": "#bcbd22",
    "self": "#9467bd",
    "local": "#17becf",
    "sink": "#7f7f7f",
    "diffuse": "#dcdcdc",
    "mixed": "#e6d27a",
}
ABBREV = {
    "induction": "ind", "copying": "cpy", "previous-token": "prv", "positional": "pos", "duplicate": "dup",
    "syntax": "syn", "global": "glb", "long-range": "lng", "self": "slf", "local": "loc", "sink": "snk",
    "diffuse": "dif", "mixed": "mix",
}
LABEL_HELP = {
    "induction": "attends to the token after an earlier copy of the query's token (A B … A → B)",
    "copying": "its strongest key holds the token the model produces next (pointer / retrieval)",
    "previous-token": "attends one position back",
    "positional": "attends at a fixed offset back (shown as p-k for offset −k)",
    "duplicate": "attends to earlier copies of the query's token",
    "syntax": "attends to separators and punctuation (a proxy: real syntax needs a parse)",
    "global": "columns that every row attends to, at any position (BOS, separators)",
    "long-range": "attention far back that is not on global columns",
    "self": "attends to the query's own position",
    "local": "spread over the few most recent keys",
    "sink": "parks attention on the first token",
    "diffuse": "spread evenly, no pattern",
    "mixed": "concentrated, but on no fixed pattern",
}
SCORE_TITLES = {
    "sink": "first token", "self": "self", "prev": "previous token", "local": "local window",
    "duplicate": "duplicate token", "induction": "induction", "entropy": "entropy (normalised)",
    "distance": "mean distance", "global": "global columns", "positional": "positional (best offset)",
    "copying": "copying (retrieval)", "syntax": "separators / punctuation", "long_range": "long range",
    "long-range": "long range",
}
# Scores whose strongest heads open the report when no probe says otherwise, most specific first.
SPECIFIC_FIRST = ("induction", "copying", "previous-token", "positional", "duplicate", "syntax", "global",
                  "long-range", "self")
DEFAULT_MATRIX_BUDGET = 6_000_000  # bytes of matrix data embedded (about 8 MB of base64)
DEFAULT_SPAN_BUDGET = 3_000_000  # bytes of per-head span masses embedded (head averages always are)
CELL_W, CELL_H, GRID_LEFT, GRID_TOP = 46, 19, 36, 18
RAMP_END = (8, 69, 148)  # the score ramp runs linearly from white to this blue (the same in the script)
SPAN_PALETTE = ("#e6550d", "#31a354", "#756bb1", "#3182bd", "#e7298a", "#a6761d", "#66a61e", "#d95f02")
GENERATED_COLOUR, REST_COLOUR, UNKNOWN_COLOUR = "#0a4f9c", "#c9c9c9", "#f2f2f2"


def write_report(dump: AttentionDump, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.write_text(render_report(dump, **kwargs), encoding="utf-8")
    return path


def render_report(
    dump: AttentionDump,
    thresholds: Thresholds | None = None,
    title: str | None = None,
    matrix_budget: int = DEFAULT_MATRIX_BUDGET,
    colour_by: str = "label",
    span_budget: int = DEFAULT_SPAN_BUDGET,
) -> str:
    """The page as a string. `colour_by`: "label" or a score name (the grid's first colouring)."""
    stats = dump.stats if dump.stats is not None else dump.recompute_stats()
    scores = stats.scores()
    if colour_by != "label" and colour_by not in scores:
        raise ValueError(f"colour_by must be 'label' or a score ({', '.join(scores)}), got {colour_by!r}")
    thresholds = thresholds or Thresholds()
    labels = label_heads(stats, thresholds)
    legend_names = legend_labels(labels)
    selected = _default_head(dump, stats, labels)
    embedded = _heads_to_embed(dump, stats, selected, matrix_budget)
    spans = span_masses(dump)
    payload = _payload(dump, stats, scores, labels, legend_names, selected, embedded, spans, colour_by,
                       span_budget)
    domains = payload["domains"]
    title = title or _title(dump)
    body = "\n".join([
        f"<header><h1>{_esc(title)}</h1><p class=meta>{_esc(_meta_line(dump, stats, thresholds))}</p></header>",
        "<main>",
        "<section id=heads><h2>Heads <small>(layer &times; head; primary label, secondary beside it)</small></h2>",
        _controls(scores, colour_by),
        _grid_svg(dump, stats, labels),
        _scale_html(colour_by, domains.get(colour_by)),
        _legend(labels, legend_names, hidden=colour_by != "label"),
        f"<div id=details class=panel>{_details_html(labels, selected, scores)}</div>",
        "</section>",
        "<section id=head><h2 id=head-title>Head</h2><p class=hint>rows: queries (one per step), columns: keys; "
        "colour &prop; &radic;p; hover for values and full token text, click a row to open that step below. "
        "<label>cell size <select id=zoom><option value=0>fit (at least 8 px)</option><option value=3>3 px"
        "</option><option value=5>5 px</option><option value=8>8 px</option><option value=12>12 px</option>"
        "<option value=16>16 px</option></select></label></p>"
        "<div id=matrix-note class=note></div>"
        "<div id=mwrap class=mwrap><canvas id=m-corner width=10 height=10></canvas>"
        "<canvas id=m-keys width=10 height=10></canvas><canvas id=m-rows width=10 height=10></canvas>"
        "<canvas id=matrix width=10 height=10></canvas></div>"
        "<p id=matrix-hover class=status>&nbsp;</p></section>",
        "</main>",
        _spans_section(dump, spans),
        f"<section id=tops>{_top_table(stats, scores)}</section>",
        "<section id=steps><h2>Steps <small>(what the query that produced each token looked at)</small></h2>"
        "<p class=hint>Click a token that has a step (underlined). Keys are shaded by the chosen head's attention"
        + ("; spans of the prompt are marked by a coloured bar under their tokens" if spans else "")
        + ".</p><div id=strip class=strip></div><div id=step-detail></div></section>",
        _reading_guide(thresholds, stats, legend_names),
        f'<script type="application/json" id=data>{_json_for_script(payload)}</script>',
        f"<script>{_SCRIPT}</script>",
    ])
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


# ---- labels ----------------------------------------------------------------------------------------------
def base_label(name: str) -> str:
    """The known label a name belongs to ("long_range" -> "long-range", "positional-2" -> "positional")."""
    norm = str(name).replace("_", "-")
    if norm in LABEL_COLOURS:
        return norm
    for known in sorted(LABEL_COLOURS, key=len, reverse=True):
        if norm.startswith(known):
            return known
    return norm


def label_colour(name: str) -> str:
    """A label's colour: fixed for the known ones, derived from the name (stable) for any other."""
    known = LABEL_COLOURS.get(base_label(name))
    if known is not None:
        return known
    hue = int(hashlib.sha256(str(name).encode()).hexdigest()[:6], 16) / 0xFFFFFF
    r, g, b = colorsys.hls_to_rgb(hue, 0.62, 0.55)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def label_offset(name: str, detail: dict | None) -> int | None:
    """The fixed offset of a positional label, from its detail (or a trailing number in its name)."""
    if base_label(name) not in ("positional", "previous-token"):
        return None
    for key in ("offset", "best_offset", "positional_offset"):
        v = (detail or {}).get(key)
        if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)) and float(v) == int(v):
            return abs(int(v))
    if base_label(name) == "previous-token":
        return 1
    m = re.search(r"(\d+)\D*$", str(name))
    return int(m[1]) if m else None


def label_abbrev(name: str, detail: dict | None = None) -> str:
    base = base_label(name)
    if base == "positional":
        off = label_offset(name, detail)
        return f"p-{off}" if off is not None else "pos"
    return ABBREV.get(base, re.sub(r"[^a-z0-9]", "", base.lower())[:3] or "?")


def label_text(name: str, detail: dict | None = None) -> str:
    """The label as a reader sees it: "positional (offset −2)"."""
    if base_label(name) == "positional":
        off = label_offset(name, detail)
        if off is not None:
            return f"positional (offset \u2212{off})"
    return str(name)


def legend_labels(labels) -> list[str]:
    """Every label the labeller can give (LABELS, in priority order), then any other label the heads carry."""
    names = list(LABELS)
    for lab in labels:
        for name in (lab.label, lab.secondary):
            if name is not None and name not in names:
                names.append(name)
    return names


def _detail(lab) -> dict:
    return dict(lab.detail or {})


def _fmt_detail(detail: dict, tokens: list[str]) -> str:
    """One line per detail entry; positions are shown with their tokens."""
    lines = []
    for key, v in detail.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if v is None or (isinstance(v, (list, tuple, dict, str)) and not v):
            continue  # nothing to say (e.g. no global column)
        if isinstance(v, (float, np.floating)):
            text = f"{float(v):.3g}"
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, np.integer)) for x in v) and any(
                w in key for w in ("pos", "column", "key")):
            shown = [f"{int(x)} \u00ab{_vis(tokens[int(x)])}\u00bb" if 0 <= int(x) < len(tokens) else str(int(x))
                     for x in v[:8]]
            text = ", ".join(shown) + (f", \u2026 ({len(v)})" if len(v) > 8 else "")
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) and "position" in x for x in v):
            shown = []
            for x in v[:8]:
                p = int(x["position"])
                tok = f" \u00ab{_vis(tokens[p])}\u00bb" if 0 <= p < len(tokens) else ""
                rest = " ".join(f"{k} {y:.3g}" if isinstance(y, (float, np.floating)) else f"{k} {y}"
                                for k, y in x.items() if k not in ("position", "token_id"))
                shown.append(f"{p}{tok}" + (f" ({rest})" if rest else ""))
            text = ", ".join(shown) + (f", \u2026 ({len(v)})" if len(v) > 8 else "")
        elif isinstance(v, (list, tuple)):
            text = ", ".join(f"{x:.3g}" if isinstance(x, (float, np.floating)) else str(x) for x in v[:10])
            text += ", \u2026" if len(v) > 10 else ""
        elif isinstance(v, dict):
            text = ", ".join(f"{k}: {x:.3g}" if isinstance(x, (float, np.floating)) else f"{k}: {x}"
                             for k, x in list(v.items())[:10])
        else:
            text = str(v)
        lines.append(f"{str(key).replace('_', ' ')}: {text[:200]}")
    return "\n".join(lines)


def _label_entry(lab, tokens: list[str]) -> dict:
    detail = _detail(lab)
    sec = lab.secondary
    if not {base_label(lab.label), base_label(sec or "")} & {"positional", "previous-token"}:
        detail.pop("offset", None)  # the best offset of a head that is not positional means nothing
    score = _finite(lab.score)
    text = label_text(lab.label, detail) + ("" if score is None else f" {score:.2f}")
    if sec:
        text += f" \u00b7 {label_text(sec, detail)}"
    return {
        "p": str(lab.label), "s": score, "sec": sec, "text": text, "detail": _fmt_detail(detail, tokens),
        "op": round(_opacity(lab), 2), "ab": label_abbrev(lab.label, detail),
        "secAb": label_abbrev(sec, detail) if sec else None,
    }


def _opacity(lab) -> float:
    if base_label(lab.label) in ("diffuse", "mixed"):
        return 1.0
    score = _finite(lab.score) or 0.0
    return 0.35 + 0.65 * min(max(score, 0.0), 1.0)


# ---- spans -----------------------------------------------------------------------------------------------
@dataclass
class SpanView:
    """Per step, the attention mass on each span of the prompt, the generated tokens and the rest."""

    names: list[str]  # the spans, in order
    ranges: list[tuple[int, int]]  # token positions, end exclusive
    masses: np.ndarray  # float32 [L, H, S, len(names) + 3]: spans, generated, rest of prompt, unknown
    notes: list[str]  # spans that were dropped, and why

    @property
    def buckets(self) -> list[str]:
        return [*self.names, "generated", "rest of prompt", "unknown"]


def parse_spans(raw, n_tokens: int) -> tuple[list[tuple[str, int, int]], list[str]]:
    """`info["spans"]` (dicts with name/start/end, or objects with those attributes, or 3-tuples) checked
    leniently for the report: a malformed or overlapping span is dropped with a note, never an error."""
    spans, notes = [], []
    for item in raw or []:
        try:
            if isinstance(item, dict):
                name, start, end = item["name"], item["start"], item["end"]
            elif hasattr(item, "start") and hasattr(item, "end"):
                name, start, end = getattr(item, "name", ""), item.start, item.end
            else:
                name, start, end = item
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            notes.append(f"span {item!r} dropped: expected name, start, end")
            continue
        name = str(name) or f"span{len(spans)}"
        if not 0 <= start < end <= n_tokens:
            notes.append(f"span {name} [{start}, {end}) dropped: not inside the {n_tokens} tokens")
        elif any(start < e and s < end for _, s, e in spans):
            notes.append(f"span {name} [{start}, {end}) dropped: overlaps an earlier span")
        else:
            spans.append((name, start, end))
    return spans, notes


def span_masses(dump: AttentionDump) -> SpanView | None:
    """The span view's numbers, from the stored rows; None when `dump.info` names no spans.

    Full rows: exact (the float16 values as stored). Top-k rows: the kept entries, and their leftover as
    "unknown" (it falls somewhere in the row, on keys that were not stored)."""
    raw = dump.info.get("spans") if isinstance(dump.info, dict) else None
    if not raw:
        return None
    spans, notes = parse_spans(raw, len(dump.token_ids))
    if not spans:
        return SpanView([], [], np.zeros((len(dump.layers), len(dump.heads), dump.num_steps, 3), np.float32), notes)
    n = len(spans)
    n_keys = len(dump.token_ids)
    bucket = np.where(np.arange(n_keys) >= dump.prompt_len, n, n + 1)  # generated, else rest of the prompt
    for i, (_, start, end) in enumerate(spans):
        bucket[start:end] = i
    n_b = n + 3
    n_l, n_h, n_s = len(dump.layers), len(dump.heads), dump.num_steps
    out = np.zeros((n_l, n_h, n_s, n_b), np.float64)
    if dump.values is not None:
        off = np.asarray(dump.row_offsets, np.int64)
        b_col = bucket[np.asarray(dump.key_positions, np.int64)]
        for li in range(n_l):  # one layer at a time bounds the float64 scratch to [H, R]
            vals = np.asarray(dump.values[li], np.float64)
            for b in range(n + 2):
                cs = np.concatenate([np.zeros((n_h, 1)), np.cumsum(np.where(b_col == b, vals, 0.0), axis=1)], 1)
                out[li, :, :, b] = cs[:, off[1:]] - cs[:, off[:-1]]
    else:
        pos = np.asarray(dump.topk.positions, np.int64)
        vals = np.asarray(dump.topk.values, np.float64)
        kept = pos >= 0
        b_pos = np.where(kept, bucket[np.clip(pos, 0, n_keys - 1)], -1)
        for b in range(n + 2):
            out[..., b] = np.where(b_pos == b, vals, 0.0).sum(-1)
        out[..., n + 2] = np.clip(np.asarray(dump.topk.leftover, np.float64), 0.0, 1.0)
    names = [s[0] for s in spans]
    return SpanView(names, [(s, e) for _, s, e in spans], out.astype(np.float32), notes)


def _encode_u16(a: np.ndarray) -> str:
    q = np.round(np.clip(a, 0.0, 1.0) * 65535).astype("<u2")
    return base64.b64encode(q.tobytes()).decode()


def _span_payload(view: SpanView, budget: int) -> dict:
    n_l, n_h, n_s, n_b = view.masses.shape
    avg = view.masses.mean(axis=1, keepdims=True)  # [L, 1, S, B]
    per_head = n_l * (n_h + 1) * n_s * n_b * 2 <= budget
    data = np.concatenate([view.masses, avg], axis=1) if per_head else avg
    colours = [SPAN_PALETTE[i % len(SPAN_PALETTE)] for i in range(len(view.names))]
    return {
        "names": view.names, "ranges": [list(r) for r in view.ranges], "buckets": view.buckets,
        "colours": colours + [GENERATED_COLOUR, REST_COLOUR, UNKNOWN_COLOUR],
        "perHead": per_head, "steps": n_s, "masses": _encode_u16(data), "notes": view.notes,
    }


def _spans_section(dump: AttentionDump, view: SpanView | None) -> str:
    if view is None:
        return ""
    colours = [SPAN_PALETTE[i % len(SPAN_PALETTE)] for i in range(len(view.names))]
    keys = []
    for name, (start, end), colour in zip(view.names, view.ranges, colours):
        text = "".join(dump.token_texts[start:end])
        text = text if len(text) <= 60 else text[:59] + "\u2026"
        keys.append(f'<li class=key data-span="{_esc(name)}" title="{_esc(text)}"><i style="background:{colour}">'
                    f'</i><b>{_esc(name)}</b> [{start}, {end}) <small>\u00ab{_esc(_vis(text))}\u00bb</small></li>')
    for name, colour, help_text in (
            ("generated", GENERATED_COLOUR, "tokens sampled so far"),
            ("rest of prompt", REST_COLOUR, "prompt tokens in no span"),
            ("unknown", UNKNOWN_COLOUR, "top-k rows: the mass of entries not stored")):
        if name == "unknown" and dump.mode == "full":
            continue
        keys.append(f'<li class=key title="{_esc(help_text)}"><i style="background:{colour}"></i>{name}</li>')
    notes = "".join(f"<p class=note>{_esc(n)}</p>" for n in view.notes)
    how = ("exact, from the stored rows" if dump.mode == "full" else
           "from the stored top-k entries; the rest of each row is \u201cunknown\u201d")
    return (
        "<section id=spans><h2>Attention to spans <small>(per step: the share of the query's attention on each "
        f"span, on the generated tokens and on the rest of the prompt; {how})</small></h2>{notes}"
        f"<ul id=span-legend class=legend>{''.join(keys)}</ul>"
        "<div class=spanrow><span id=span-avg-title class=spanlbl>heads averaged</span>"
        "<div class=spanbox><canvas id=span-avg width=10 height=10></canvas></div></div>"
        "<div class=spanrow><span id=span-head-title class=spanlbl>head</span>"
        "<div class=spanbox><canvas id=span-head width=10 height=10></canvas></div></div>"
        "<p id=span-hover class=status>&nbsp;</p><div id=span-step></div></section>")


# ---- data ------------------------------------------------------------------------------------------------
def _payload(dump, stats, scores, labels, legend_names, selected, embedded, spans, colour_by, span_budget) -> dict:
    tokens = list(dump.token_texts)
    grid_labels = [[None] * len(stats.heads) for _ in stats.layers]
    for lab in labels:
        grid_labels[stats.layers.index(lab.layer)][stats.heads.index(lab.head)] = _label_entry(lab, tokens)
    colours = {name: label_colour(name) for name in legend_names}
    return {
        "tokens": tokens,
        "tokenIds": [int(t) for t in dump.token_ids],
        "promptLen": dump.prompt_len,
        "layers": list(stats.layers),
        "heads": list(stats.heads),
        "kvGroup": [int(g) for g in dump.kv_group],
        "queries": [int(q) for q in dump.query_positions],
        "scoreNames": list(scores),
        "scores": {name: _clean(np.round(np.asarray(v, np.float64), 4)) for name, v in scores.items()},
        "domains": {name: _domain(v) for name, v in scores.items()},
        "labels": grid_labels,
        "colours": colours,
        "scoreTitles": {name: score_title(name) for name in scores},
        "colourBy": colour_by,
        "selected": list(selected),
        "matrices": {f"{layer},{head}": _encode_matrix(dump, layer, head) for layer, head in embedded},
        "mode": dump.mode,
        "spans": None if spans is None or not spans.names else _span_payload(spans, span_budget),
    }


def score_title(name: str) -> str:
    titles = {**SCORE_TITLES, **STATS_SCORE_TITLES}  # the statistics' own titles win
    return titles.get(name, str(name).replace("_", " "))


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _clean(a: np.ndarray):
    """Nested lists with None for NaN/inf (JSON has neither)."""
    return [_clean(x) for x in a] if a.ndim > 1 else [_finite(x) for x in a.tolist()]


def _domain(values) -> dict:
    """The colour scale of a score: [0, 1] when every value lies there ("unit": cells show × 100),
    else from min(0, lowest) to the highest."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or (v.min() >= 0 and v.max() <= 1):
        return {"lo": 0.0, "hi": 1.0, "unit": True}
    lo, hi = min(0.0, float(v.min())), float(v.max())
    return {"lo": lo, "hi": hi if hi > lo else lo + 1.0, "unit": False}


def _encode_matrix(dump: AttentionDump, layer: int, head: int) -> str:
    """The head's rows (each dense over keys 0..query) as bytes on a square-root scale, base64."""
    m = dump.matrix(layer, head)
    rows = [m[s, : int(q) + 1] for s, q in enumerate(dump.query_positions)]
    flat = np.concatenate(rows) if rows else np.zeros(0, np.float32)
    return base64.b64encode(np.round(np.sqrt(np.clip(flat, 0, 1)) * 255).astype(np.uint8).tobytes()).decode()


def _default_head(dump: AttentionDump, stats, labels) -> tuple[int, int]:
    """The probe's best induction head; otherwise the strongest head of the most specific label present."""
    if dump.info.get("source") == "probe" and "induction" in stats.scores():
        layer, head, _ = top_heads(stats, "induction", 1)[0]
        return layer, head
    for kinds in (SPECIFIC_FIRST, ("local",), None):
        named = [lab for lab in labels if kinds is None or base_label(lab.label) in kinds]
        if named:
            best = max(named, key=lambda lab: _finite(lab.score) or 0.0)
            return best.layer, best.head
    return stats.layers[0], stats.heads[0]


def _heads_to_embed(dump: AttentionDump, stats, selected, budget: int) -> list[tuple[int, int]]:
    """Every head's matrix if it fits the budget; else the selected head and the top heads of each score."""
    per_head = int(sum(int(q) + 1 for q in dump.query_positions))
    every = [(layer, head) for layer in stats.layers for head in stats.heads]
    if per_head * len(every) <= budget:
        return every
    picked = [tuple(selected)]
    for name in stats.scores():
        picked += [(layer, head) for layer, head, _ in top_heads(stats, name, 5)]
    picked = list(dict.fromkeys(picked))
    return picked[: max(1, budget // max(per_head, 1))]


# ---- static HTML -----------------------------------------------------------------------------------------
def _title(dump: AttentionDump) -> str:
    model = Path(str(dump.info.get("model", "model"))).name
    return f"Attention report: {model}" + (" (induction probe)" if dump.info.get("source") == "probe" else "")


def _thresholds_text(t) -> str:
    if dataclasses.is_dataclass(t):
        return ", ".join(f"{f.name.replace('_', ' ')} {getattr(t, f.name)}" for f in dataclasses.fields(t))
    return str(t)


def _meta_line(dump: AttentionDump, stats, t) -> str:
    gen = len(dump.token_ids) - dump.prompt_len
    parts = [
        f"{len(dump.token_ids)} tokens ({dump.prompt_len} given, {gen} sampled)",
        f"{dump.num_steps} recorded rows",
        f"{len(stats.layers)} of {dump.n_layers} layers, {len(stats.heads)} of {dump.n_heads} heads "
        f"over {dump.n_kv_heads} KV heads",
        f"rows stored {'in full' if dump.mode == 'full' else 'as top-' + str(dump.topk.positions.shape[-1])}",
    ]
    window = getattr(stats, "window", None)
    if window is not None:
        parts.append(f"local window {window}")
    parts.append(f"thresholds: {_thresholds_text(t)}")
    if dump.info.get("source") == "probe":
        parts.append(f"probe: BOS + {dump.info.get('probe_length')} random tokens twice, seed "
                     f"{dump.info.get('probe_seed')}")
    return " · ".join(parts)


def _controls(scores: dict, colour_by: str) -> str:
    options = "".join(
        f"<option value=\"{_esc(name)}\"{' selected' if name == colour_by else ''}>{_esc(score_title(name))}"
        "</option>" for name in scores)
    sel = " selected" if colour_by == "label" else ""
    return (f"<p class=controls>colour by <select id=colour-by><option value=label{sel}>label</option>{options}"
            "</select></p>")


def _fmt_tick(v: float, dom: dict) -> str:
    if dom["unit"]:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.0f}" if max(abs(dom["lo"]), abs(dom["hi"])) >= 10 else f"{v:.1f}"


def _scale_html(colour_by: str, dom: dict | None) -> str:
    """The colour scale of score mode (hidden in label mode); the script redraws it on every change."""
    if colour_by == "label" or dom is None:
        return "<div id=scale class=scale hidden></div>"
    return f"<div id=scale class=scale>{_scale_inner(score_title(colour_by), dom)}</div>"


def _scale_inner(title: str, dom: dict) -> str:
    # Keep in step with scaleHtml() in the script.
    ticks = "".join(
        f'<span class=tick style="left:{25 * i}%">{_fmt_tick(dom["lo"] + (dom["hi"] - dom["lo"]) * i / 4, dom)}</span>'
        for i in range(5))
    note = "cells show the score &times; 100" if dom["unit"] else "cells show the score"
    return (f"<span class=scale-title>{_esc(title)}</span><span class=scale-body><span class=scale-bar></span>"
            f"<span class=scale-ticks>{ticks}</span></span><span class=scale-note>{note}</span>")


def _grid_svg(dump: AttentionDump, stats, labels) -> str:
    n_l, n_h = len(stats.layers), len(stats.heads)
    width, height = GRID_LEFT + n_h * CELL_W + 2, GRID_TOP + n_l * CELL_H + 2
    out = [f'<svg id=grid width={width} height={height} viewBox="0 0 {width} {height}" role=img '
           f'aria-label="layer by head grid">']
    for hi, head in enumerate(stats.heads):
        x = GRID_LEFT + hi * CELL_W + CELL_W / 2
        out.append(f'<text class=ax x={x} y=12 text-anchor=middle>H{head}</text>')
    by_pos = {(lab.layer, lab.head): lab for lab in labels}
    tokens = list(dump.token_texts)
    for li, layer in enumerate(stats.layers):
        y = GRID_TOP + li * CELL_H
        out.append(f'<text class=ax x={GRID_LEFT - 4} y={y + 13} text-anchor=end>L{layer}</text>')
        for hi, head in enumerate(stats.heads):
            lab = by_pos[(layer, head)]
            detail = _detail(lab)
            sec = lab.secondary
            x = GRID_LEFT + hi * CELL_W
            score = _finite(lab.score)
            tip = (f"L{layer} H{head} (KV head {int(dump.kv_group[head])}): {label_text(lab.label, detail)}"
                   + ("" if score is None else f" {score:.2f}")
                   + (f"\nsecondary: {label_text(sec, detail)}" if sec else ""))
            extra = _fmt_detail(detail, tokens)
            tip += ("\n" + extra if extra else "") + "\n" + "\n".join(
                f"{score_title(k)}: {v:.3f}" for k, v in lab.scores.items() if _finite(v) is not None)
            strip = (f'<rect class=sec x={x} y={y + CELL_H - 5} width={CELL_W - 1} height=4 '
                     f'fill="{label_colour(sec)}"></rect>') if sec else ""
            text = _esc(label_abbrev(lab.label, detail))
            if sec:
                text += f"<tspan class=sec dx=2>{_esc(label_abbrev(sec, detail))}</tspan>"
            out.append(
                f'<g class=cell data-l={layer} data-h={head} data-label="{_esc(lab.label)}"'
                + (f' data-secondary="{_esc(sec)}"' if sec else "")
                + f'><rect class=bg x={x} y={y} width={CELL_W - 1} height={CELL_H - 1}'
                f' fill="{label_colour(lab.label)}" fill-opacity={_opacity(lab):.2f}></rect>{strip}'
                f'<text x={x + CELL_W / 2} y={y + 12} text-anchor=middle>{text}</text>'
                f'<title>{_esc(tip)}</title></g>')
    # Heads that share a KV head sit between thicker lines (grouped-query attention).
    group = dump.n_heads // dump.n_kv_heads
    for hi, head in enumerate(stats.heads[1:], start=1):
        if head // group != stats.heads[hi - 1] // group:
            x = GRID_LEFT + hi * CELL_W - 0.5
            out.append(f'<line x1={x} y1={GRID_TOP} x2={x} y2={height - 2} class=kvsep></line>')
    out.append("</svg>")
    return "".join(out)


def _details_html(labels, selected, scores: dict) -> str:
    lab = next(x for x in labels if (x.layer, x.head) == tuple(selected))
    items = "".join(f"<span>{_esc(score_title(k))} <b>{v:.3f}</b></span>" for k, v in lab.scores.items()
                    if _finite(v) is not None)
    sec = lab.secondary
    score = _finite(lab.score)
    head = f"L{lab.layer} H{lab.head}: {label_text(lab.label, _detail(lab))}" + (
        "" if score is None else f" {score:.2f}") + (f" \u00b7 {label_text(sec, _detail(lab))}" if sec else "")
    return f"<h3>{_esc(head)}</h3><div class=scores>{items}</div>"


def _legend(labels, names: list[str], hidden: bool = False) -> str:
    """Every label with its colour, abbreviation and how many heads carry it (as primary, as secondary)."""
    primary = {name: 0 for name in names}
    secondary = {name: 0 for name in names}
    for lab in labels:
        primary[lab.label] = primary.get(lab.label, 0) + 1
        sec = lab.secondary
        if sec:
            secondary[sec] = secondary.get(sec, 0) + 1
    items = []
    for name in names:
        count = f"{primary[name]}" + (f" + {secondary[name]} secondary" if secondary[name] else "")
        help_text = LABEL_HELP.get(base_label(name), "see docs/ATTENTION.md, Labels")
        items.append(
            f'<li class=key data-label="{_esc(name)}" title="{_esc(help_text)}"><i style="background:'
            f'{label_colour(name)}"></i><b>{_esc(label_abbrev(name))}</b> {_esc(name)} ({count})</li>')
    return f"<ul id=legend class=legend{' hidden' if hidden else ''}>{''.join(items)}</ul>"


def _top_table(stats, scores: dict) -> str:
    """The five best heads of every score, one score a row."""
    rows = []
    for name in scores:
        tops = top_heads(stats, name, 5)
        cells = "".join(
            f'<td class=pick data-l={layer} data-h={head}>L{layer} H{head} <b>{v:.3f}</b></td>'
            for layer, head, v in tops)
        rows.append(f"<tr><th>{_esc(score_title(name))}</th>{cells}</tr>")
    return ("<h3>Top heads per score</h3><div class=tablebox><table class=top><tr><th>score</th>"
            + "".join(f"<th>#{i + 1}</th>" for i in range(5)) + "</tr>" + "".join(rows) + "</table></div>")


def _reading_guide(t, stats, names: list[str]) -> str:
    window = getattr(stats, "window", None)
    items = "".join(
        f"<li><b>{_esc(name)}</b>: {_esc(LABEL_HELP.get(base_label(name), 'see docs/ATTENTION.md'))}</li>"
        for name in names)
    return f"""<section id=guide><h2>How to read this</h2><ul>
<li>Each head gets a <b>primary</b> label (the cell's colour and first abbreviation) and, where a second
pattern also holds, a <b>secondary</b> one (beside it, and the strip along the cell's foot). Brighter cells
have a higher label score. Thresholds: {_esc(_thresholds_text(t))}{f"; local window {window}" if window else ""}.
The formula of every score and label rule is in docs/ATTENTION.md (Head statistics, Labels).</li>
<li>Labels:<ul class=labels>{items}</ul></li>
<li><i>colour by</i> a score shows that score in every cell, with its colour scale under the grid.</li>
<li>The matrix is the step rows stacked: row <i>q</i> is where the query at position <i>q</i> looked when the
model chose the token at <i>q</i>+1. It is the same row the server's <code>/generate</code> streams as
<code>attention</code> for that token.</li></ul></section>"""


def _json_for_script(payload: dict) -> str:
    # Inside <script>, "</script>" or "<!--" in a token would end the block: escape the angle brackets.
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _vis(text: str) -> str:
    return str(text).replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
body{font:13px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:14px 18px;color:#222}
h1{font-size:19px;margin:0 0 2px}h2{font-size:15px;margin:8px 0 6px}h3{font-size:13px;margin:8px 0 4px}
small{font-weight:normal;color:#666}.meta,.hint{color:#555;margin:2px 0 6px}
main{display:grid;grid-template-columns:auto minmax(0,1fr);gap:22px;align-items:start}
#heads{max-width:480px}#head{min-width:0}
#grid text{font-size:9.5px;fill:#111;pointer-events:none}#grid text.ax{fill:#555;font-size:10px}
#grid tspan.sec{font-size:8px;fill:#333}
#grid .cell{cursor:pointer}#grid .cell.sel rect.bg{stroke:#000;stroke-width:2}
#grid .kvsep{stroke:#333;stroke-width:1.5}
.panel{font-size:12px;min-height:8em}.panel .detail{white-space:pre-line;color:#444;margin:2px 0}
.scores{display:flex;flex-wrap:wrap}.scores span{width:50%}
ul.legend{list-style:none;padding:0;margin:6px 0;display:flex;flex-wrap:wrap;gap:2px 12px}
ul.legend[hidden]{display:none}
.legend .key{white-space:nowrap}.legend i{display:inline-block;width:11px;height:11px;
margin-right:3px;vertical-align:-1px;border:1px solid #999}.legend b{font-family:ui-monospace,Menlo,monospace;
font-size:11px;margin-right:2px}
.scale{display:flex;align-items:flex-start;gap:8px;margin:6px 0 4px;font-size:11.5px}.scale[hidden]{display:none}
.scale-body{position:relative;display:inline-block;width:220px;height:30px}
.scale-bar{position:absolute;left:0;right:0;top:0;height:12px;border:1px solid #999;
background:linear-gradient(to right,#fff,rgb(8,69,148))}
.scale-ticks .tick{position:absolute;top:14px;transform:translateX(-50%);font-variant-numeric:tabular-nums}
.scale-ticks .tick::before{content:"";position:absolute;left:50%;top:-3px;height:3px;border-left:1px solid #666}
.scale-title{font-weight:600}.scale-note{color:#666}
.tablebox{overflow-x:auto}
table.top{border-collapse:collapse;font-size:11.5px}table.top td,table.top th{border:1px solid #ddd;
padding:1px 5px;text-align:left;white-space:nowrap}table.top td.pick{cursor:pointer}
table.top td.pick:hover{background:#eef}
.mwrap{display:grid;grid-template-columns:auto auto;justify-content:start;overflow:auto;max-width:100%;
max-height:78vh;border:1px solid #ccc}
.mwrap canvas{display:block}#m-corner{position:sticky;top:0;left:0;z-index:3;background:#fff}
#m-keys{position:sticky;top:0;z-index:2;background:#fff}#m-rows{position:sticky;left:0;z-index:2;background:#fff}
.status{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;min-height:1.4em}.note{color:#a33}
.strip{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;line-height:2.1;max-height:260px;
overflow:auto;border:1px solid #ddd;padding:4px}
.strip span,.strip em{display:inline-block}
.strip span{padding:0 1px;margin:0 1px;border-radius:2px;white-space:pre;line-height:1.5}
.strip span.step{text-decoration:underline;cursor:pointer}.strip span.gen{color:#0a4f9c;font-weight:600}
.strip span.q{outline:2px solid #d62728}.strip span.next{outline:2px dashed #2ca02c}
.strip span.sp{border-bottom:3px solid;border-radius:0}
.strip em.spantag{font-style:normal;font-size:10px;font-family:system-ui,sans-serif;border:1px solid;
border-radius:3px;padding:0 3px;margin:0 2px 0 4px;vertical-align:1px}
#step-detail table,#span-step table{border-collapse:collapse;font-size:12px}
#step-detail td,#span-step td,#span-step th{border:1px solid #eee;padding:1px 6px;
font-family:ui-monospace,Menlo,Consolas,monospace}#span-step th{font-family:inherit;text-align:left}
#span-step td.num{text-align:right}#span-step i{display:inline-block;width:10px;height:10px;margin-right:4px;
border:1px solid #999;vertical-align:-1px}
.spanrow{display:flex;align-items:center;gap:8px;margin:2px 0}.spanlbl{width:150px;font-size:12px;
text-align:right;color:#333}.spanbox{overflow-x:auto;max-width:calc(100% - 160px)}.spanbox canvas{display:block}
ul.labels{margin:2px 0}
code{background:#f3f3f3;padding:0 3px}
"""

_SCRIPT = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("data").textContent);
  const L = D.layers, H = D.heads, Q = D.queries;
  function $(id) { return document.getElementById(id); }
  function li(l) { return L.indexOf(l); }
  function hi(h) { return H.indexOf(h); }
  let sel = D.selected, step = Math.max(0, Q.length - 1), colourBy = D.colourBy, zoom = 0;
  // The URL fragment opens a view: #colour=induction&head=18,6&step=40&zoom=8
  location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    const i = kv.indexOf("=");
    if (i < 0) return;
    const k = decodeURIComponent(kv.slice(0, i)), v = decodeURIComponent(kv.slice(i + 1));
    if (k === "colour" && (v === "label" || v in D.scores)) colourBy = v;
    if (k === "head") { const p = v.split(",").map(Number); if (li(p[0]) >= 0 && hi(p[1]) >= 0) sel = p; }
    if (k === "step" && +v >= 0 && +v < Q.length) step = +v;
    if (k === "zoom" && +v > 0) zoom = Math.min(40, +v);
  });
  const cache = {};
  const offsets = [0];
  Q.forEach(function (q) { offsets.push(offsets[offsets.length - 1] + q + 1); });
  const ncol = Q.length ? Math.max.apply(null, Q) + 1 : 0;

  function esc(t) { return String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/"/g, "&quot;"); }
  function vis(t) { return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/ /g, "\u00b7") || "\u2205"; }
  function cut(t, n) { return t.length > n ? t.slice(0, n - 1) + "\u2026" : t; }
  function matrix(l, h) {
    const key = l + "," + h;
    if (!(key in D.matrices)) return null;
    if (!cache[key]) {
      const bin = atob(D.matrices[key]), out = new Float32Array(bin.length);
      for (let i = 0; i < bin.length; i++) { const v = bin.charCodeAt(i) / 255; out[i] = v * v; }
      cache[key] = out;
    }
    return cache[key];
  }
  function label(l, h) { return D.labels[li(l)][hi(h)]; }
  function score(name, l, h) { return D.scores[name][li(l)][hi(h)]; }
  function ramp(v) {  // white -> dark blue, linear in RGB (the scale bar's CSS gradient is the same)
    const t = Math.max(0, Math.min(1, v));
    const mix = function (end) { return Math.round(255 - t * (255 - end)); };
    return "rgb(" + mix(8) + "," + mix(69) + "," + mix(148) + ")";
  }

  // ---- grid -------------------------------------------------------------------------------------
  function fmtTick(v, dom) {
    if (dom.unit) return String(+v.toFixed(2));
    return Math.max(Math.abs(dom.lo), Math.abs(dom.hi)) >= 10 ? v.toFixed(0) : v.toFixed(1);
  }
  function scaleHtml(title, dom) {  // keep in step with _scale_inner() in report.py
    let ticks = "";
    for (let i = 0; i < 5; i++) {
      ticks += '<span class=tick style="left:' + 25 * i + '%">' + fmtTick(dom.lo + (dom.hi - dom.lo) * i / 4, dom) +
        "</span>";
    }
    return "<span class=scale-title>" + esc(title) + "</span><span class=scale-body><span class=scale-bar></span>" +
      "<span class=scale-ticks>" + ticks + "</span></span><span class=scale-note>" +
      (dom.unit ? "cells show the score &times; 100" : "cells show the score") + "</span>";
  }
  function recolour() {
    const by = colourBy, dom = by === "label" ? null : D.domains[by];
    $("colour-by").value = by;
    document.querySelectorAll("#grid .cell").forEach(function (g) {
      const l = +g.dataset.l, h = +g.dataset.h, rect = g.querySelector("rect.bg"), text = g.querySelector("text");
      const strip = g.querySelector("rect.sec");
      if (g._label === undefined) g._label = text.innerHTML;
      if (by === "label") {
        const lab = label(l, h);
        rect.setAttribute("fill", D.colours[lab.p] || "#ccc");
        rect.setAttribute("fill-opacity", lab.op);
        if (strip) strip.style.display = "";
        text.innerHTML = g._label;
        text.style.fill = "";
      } else {
        const v = score(by, l, h), t = v === null ? 0 : (v - dom.lo) / (dom.hi - dom.lo);
        rect.setAttribute("fill", v === null ? "#eee" : ramp(t));
        rect.setAttribute("fill-opacity", 1);
        if (strip) strip.style.display = "none";
        text.textContent = v === null ? "\u2013"
          : dom.unit ? Math.round(v * 100) : v.toFixed(Math.abs(v) >= 10 ? 0 : 1);
        text.style.fill = t > 0.55 ? "#fff" : "#111";
      }
    });
    const scale = $("scale");
    scale.hidden = by === "label";
    if (by !== "label") scale.innerHTML = scaleHtml(D.scoreTitles[by] || by, dom);
    $("legend").hidden = by !== "label";
  }
  function details(l, h) {
    const lab = label(l, h);
    let items = "";
    D.scoreNames.forEach(function (k) {
      const v = score(k, l, h);
      if (v !== null) items += "<span>" + esc(D.scoreTitles[k] || k) + " <b>" + v.toFixed(3) + "</b></span>";
    });
    $("details").innerHTML = "<h3>L" + l + " H" + h + " (KV head " + D.kvGroup[h] + "): " + esc(lab.text) +
      "</h3>" + (lab.detail ? "<p class=detail>" + esc(lab.detail) + "</p>" : "") +
      "<div class=scores>" + items + "</div>";
  }

  // ---- heatmap: four canvases in a scrolling grid; the key and query labels stay in view -----------
  const FS = 11, ROWW = 128, KEYH = 104, ANG = Math.PI / 3, FONT = FS + "px ui-monospace,Menlo,Consolas,monospace";
  const body = $("matrix"), keysC = $("m-keys"), rowsC = $("m-rows"), corner = $("m-corner");
  let geo = null;
  function cellSize() {
    if (zoom > 0) return zoom;
    const avail = Math.max(300, ($("head").clientWidth || 800) - ROWW - 24);
    const fit = Math.floor(avail / Math.max(ncol, 1));
    // At least 8 px (scroll rather than shrink) up to 400 keys; beyond, smaller, and at most 16000 px wide.
    return Math.max(1, Math.min(18, Math.max(fit, ncol <= 400 ? 8 : 3), Math.floor(16000 / Math.max(ncol, 1))));
  }
  function keyLabel(k) { return k + " " + cut(vis(D.tokens[k]), 10); }
  function spanOf(i) {
    if (!D.spans) return -1;
    for (let j = 0; j < D.spans.ranges.length; j++) {
      if (i >= D.spans.ranges[j][0] && i < D.spans.ranges[j][1]) return j;
    }
    return -1;
  }
  function drawMatrix() {
    const l = sel[0], h = sel[1], lab = label(l, h);
    $("head-title").textContent = "Head L" + l + " H" + h + " \u2014 " + lab.text;
    const m = matrix(l, h), note = $("matrix-note");
    if (!m || !Q.length) {
      note.textContent = m ? "no rows recorded"
        : "this head's matrix was not embedded (size budget); choose a listed top head";
      [body, keysC, rowsC, corner].forEach(function (c) { c.width = 10; c.height = 10; });
      geo = null; return;
    }
    note.textContent = D.mode === "topk" ? "rows stored as top-k: other entries show as 0" : "";
    const nrow = Q.length, c = cellSize();
    body.width = ncol * c; body.height = nrow * c;
    keysC.width = ncol * c + 70; keysC.height = KEYH;
    rowsC.width = ROWW; rowsC.height = nrow * c;
    corner.width = ROWW; corner.height = KEYH;
    let ctx = body.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, body.width, body.height);
    for (let s = 0; s < nrow; s++) {
      for (let k = 0; k <= Q[s]; k++) {
        ctx.fillStyle = ramp(Math.sqrt(m[offsets[s] + k]));
        ctx.fillRect(k * c, s * c, c, c);
      }
    }
    if (step < nrow) {
      ctx.strokeStyle = "#d62728"; ctx.lineWidth = 1.5;
      ctx.strokeRect(0.75, step * c + 0.75, Math.max((Q[step] + 1) * c - 1.5, 1), Math.max(c - 1.5, 1));
    }
    // keys: every n-th label, rotated, so that neighbours never overlap; spans as bands under them
    ctx = keysC.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, keysC.width, KEYH);
    ctx.font = FONT; ctx.textBaseline = "middle";
    const everyK = Math.max(1, Math.ceil((FS + 2) / (c * Math.sin(ANG))));
    for (let k = 0; k < ncol; k += everyK) {
      ctx.fillStyle = k >= D.promptLen ? "#0a4f9c" : "#333";
      ctx.save(); ctx.translate(k * c + c / 2, KEYH - 13); ctx.rotate(-ANG);
      ctx.fillText(keyLabel(k), 0, 0); ctx.restore();
      ctx.fillStyle = "#888"; ctx.fillRect(k * c + c / 2, KEYH - 9, 1, 3);
    }
    if (D.promptLen < ncol) {
      ctx.fillStyle = "#0a4f9c"; ctx.fillRect(D.promptLen * c, KEYH - 3, (ncol - D.promptLen) * c, 2);
    }
    if (D.spans) {
      D.spans.ranges.forEach(function (r, j) {
        ctx.fillStyle = D.spans.colours[j];
        ctx.fillRect(r[0] * c, KEYH - 6, Math.max((Math.min(r[1], ncol) - r[0]) * c, 0), 4);
      });
    }
    // queries: every n-th row label, the current step's in red
    ctx = rowsC.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, ROWW, rowsC.height);
    ctx.font = FONT; ctx.textBaseline = "middle"; ctx.textAlign = "right";
    const everyR = Math.max(1, Math.ceil((FS + 1) / c));
    for (let s = 0; s < nrow; s++) {
      if (s % everyR && s !== step) continue;
      if (s !== step && Math.abs(s - step) < everyR) continue;  // keep the current step's label clear
      ctx.fillStyle = s === step ? "#d62728" : (Q[s] >= D.promptLen ? "#0a4f9c" : "#333");
      ctx.fillText(keyLabel(Q[s]), ROWW - 5, s * c + c / 2);
    }
    ctx = corner.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, ROWW, KEYH);
    ctx.fillStyle = "#666"; ctx.font = "11px system-ui,sans-serif"; ctx.textAlign = "right";
    ctx.fillText("keys \u2192", ROWW - 6, KEYH - 20); ctx.fillText("queries \u2193", ROWW - 6, KEYH - 6);
    if (everyK > 1) ctx.fillText("(a label every " + everyK + " keys)", ROWW - 6, KEYH - 34);
    geo = {c: c, m: m, everyK: everyK};
    const w = $("mwrap");  // for readers and tests: the cell size and how many keys / rows share a label
    w.dataset.cell = c; w.dataset.everyKey = everyK; w.dataset.everyRow = everyR;
  }
  function pos(canvas, e) {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  }
  function hover(text) {
    const out = $("matrix-hover");
    if (text) { out.textContent = text; } else { out.innerHTML = "&nbsp;"; }
  }
  function tokenText(i) {
    const j = spanOf(i);
    return i + " \u00ab" + vis(D.tokens[i]) + "\u00bb" + (j >= 0 ? " [span " + D.spans.names[j] + "]" : "") +
      (i >= D.promptLen ? " (sampled)" : "");
  }
  body.addEventListener("mousemove", function (e) {
    if (!geo) return;
    const p = pos(body, e), s = Math.floor(p[1] / geo.c), k = Math.floor(p[0] / geo.c);
    if (s < 0 || s >= Q.length || k < 0 || k > Q[s]) { hover(""); body.title = ""; return; }
    const text = "query " + tokenText(Q[s]) + " \u2192 key " + tokenText(k) + " : p \u2248 " +
      geo.m[offsets[s] + k].toFixed(3);
    hover(text); body.title = text;
  });
  keysC.addEventListener("mousemove", function (e) {
    if (!geo) return;
    const p = pos(keysC, e);
    // each label runs up and to the right from its column: follow the slant back to the column
    const k = Math.floor((p[0] - Math.max(0, KEYH - 13 - p[1]) / Math.tan(ANG)) / geo.c);
    if (k < 0 || k >= ncol) { hover(""); keysC.title = ""; return; }
    const text = "key " + tokenText(k);
    hover(text); keysC.title = text;
  });
  rowsC.addEventListener("mousemove", function (e) {
    if (!geo) return;
    const s = Math.floor(pos(rowsC, e)[1] / geo.c);
    if (s < 0 || s >= Q.length) { hover(""); rowsC.title = ""; return; }
    const text = "step " + s + ": query " + tokenText(Q[s]);
    hover(text); rowsC.title = text;
  });
  [body, rowsC].forEach(function (cv) {
    cv.addEventListener("click", function (e) {
      if (!geo) return;
      const s = Math.floor(pos(cv, e)[1] / geo.c);
      if (s >= 0 && s < Q.length) { step = s; refresh(); }
    });
  });

  // ---- spans ------------------------------------------------------------------------------------
  const SP = D.spans;
  let spanData = null;
  if (SP) {
    const bin = atob(SP.masses), n = bin.length >> 1;
    spanData = new Float32Array(n);
    for (let i = 0; i < n; i++) spanData[i] = (bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8)) / 65535;
  }
  // masses of step s: h = null for the head average; null when that head's masses were not embedded
  function spanRow(l, h, s) {
    const B = SP.buckets.length, HH = SP.perHead ? H.length + 1 : 1;
    let hh;
    if (h === null) { hh = SP.perHead ? H.length : 0; } else if (!SP.perHead) { return null; } else { hh = hi(h); }
    const o = ((li(l) * HH + hh) * SP.steps + s) * B;
    return spanData.subarray(o, o + B);
  }
  const SPH = 96, GUT = 30;
  function spanBars(canvas, l, h) {
    const S = Q.length, B = SP.buckets.length;
    const avail = Math.max(300, ($("spans").clientWidth || 900) - 190);
    const bw = Math.max(2, Math.min(14, Math.floor((avail - GUT) / Math.max(S, 1))));
    canvas.width = GUT + S * bw + 2; canvas.height = SPH + 16;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.font = "10px system-ui,sans-serif"; ctx.fillStyle = "#555";
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    [[0, "0"], [0.5, "0.5"], [1, "1"]].forEach(function (t) {
      const y = 4 + SPH * (1 - t[0]);
      ctx.fillText(t[1], GUT - 5, y); ctx.fillRect(GUT - 3, y, 3, 1);
    });
    if (spanRow(l, h, 0) === null && S) {
      ctx.textAlign = "left"; ctx.fillText("per-head span masses not embedded (size budget)", GUT + 4, SPH / 2);
      canvas._geo = null; return;
    }
    for (let s = 0; s < S; s++) {
      const row = spanRow(l, h, s);
      let y = 4 + SPH;
      for (let b = 0; b < B; b++) {
        const hgt = row[b] * SPH;
        if (hgt <= 0) continue;
        ctx.fillStyle = SP.colours[b]; ctx.fillRect(GUT + s * bw, y - hgt, Math.max(bw - (bw > 3 ? 1 : 0), 1), hgt);
        y -= hgt;
      }
    }
    ctx.strokeStyle = "#999"; ctx.lineWidth = 1; ctx.strokeRect(GUT - 0.5, 3.5, S * bw + 1, SPH + 1);
    if (step < S) { ctx.strokeStyle = "#d62728"; ctx.lineWidth = 2; ctx.strokeRect(GUT + step * bw, 3, bw, SPH + 2); }
    ctx.fillStyle = "#555"; ctx.textAlign = "left";
    ctx.fillText("steps \u2192 (query " + (S ? Q[0] : "") + " \u2026 " + (S ? Q[S - 1] : "") + ")", GUT, SPH + 11);
    canvas._geo = {bw: bw, l: l, h: h};
  }
  function pct(v) { return v === null || v === undefined ? "\u2013" : (100 * v).toFixed(1) + "%"; }
  function spanMean(l, h, b) {
    if (spanRow(l, h, 0) === null) return null;
    let t = 0;
    for (let s = 0; s < Q.length; s++) t += spanRow(l, h, s)[b];
    return Q.length ? t / Q.length : null;
  }
  function drawSpans() {
    if (!SP || !Q.length) return;
    const l = sel[0], h = sel[1];
    $("span-avg-title").textContent = "L" + l + ", heads averaged";
    $("span-head-title").textContent = "L" + l + " H" + h + " (" + label(l, h).p + ")";
    spanBars($("span-avg"), l, null);
    spanBars($("span-head"), l, h);
    const avg = spanRow(l, null, step), one = spanRow(l, h, step), q = Q[step];
    let rows = "";
    SP.buckets.forEach(function (name, b) {
      if (name === "unknown" && D.mode === "full") return;
      const where = b < SP.names.length ? "[" + SP.ranges[b][0] + ", " + SP.ranges[b][1] + ")" : "";
      rows += "<tr data-bucket=\"" + esc(name) + "\"><th><i style=\"background:" + SP.colours[b] + "\"></i>" +
        esc(name) + " " + where + "</th><td class=num>" + pct(avg[b]) + "</td><td class=num>" +
        pct(one ? one[b] : null) + "</td><td class=num>" + pct(spanMean(l, null, b)) + "</td><td class=num>" +
        pct(spanMean(l, h, b)) + "</td></tr>";
    });
    $("span-step").innerHTML = "<h3>Step " + step + ": query " + esc(tokenText(q)) + "</h3><table><tr><th></th>" +
      "<th>this step, L" + l + " averaged</th><th>this step, L" + l + " H" + h + "</th><th>mean over steps, " +
      "averaged</th><th>mean over steps, H" + h + "</th></tr>" + rows + "</table>";
  }
  function spanHover(canvas, e) {
    const g = canvas._geo;
    if (!g) return -1;
    const s = Math.floor((pos(canvas, e)[0] - GUT) / g.bw);
    return s >= 0 && s < Q.length ? s : -1;
  }
  if (SP) {
    ["span-avg", "span-head"].forEach(function (id) {
      const cv = $(id);
      cv.addEventListener("mousemove", function (e) {
        const s = spanHover(cv, e), out = $("span-hover");
        if (s < 0) { out.innerHTML = "&nbsp;"; return; }
        const row = spanRow(cv._geo.l, cv._geo.h, s);
        out.textContent = "step " + s + ", query " + tokenText(Q[s]) + ": " + SP.buckets.map(function (n, b) {
          return n + " " + pct(row[b]);
        }).filter(function (t, b) { return !(SP.buckets[b] === "unknown" && D.mode === "full"); }).join(" \u00b7 ");
      });
      cv.addEventListener("click", function (e) {
        const s = spanHover(cv, e);
        if (s >= 0) { step = s; refresh(); }
      });
    });
  }

  // ---- steps ------------------------------------------------------------------------------------
  const stepOfToken = {};
  Q.forEach(function (q, s) { stepOfToken[q + 1] = s; });
  function drawStrip() {
    const strip = $("strip"), m = matrix(sel[0], sel[1]);
    const q = Q.length ? Q[step] : -1;
    let htmlText = "";
    D.tokens.forEach(function (t, i) {
      let cls = i >= D.promptLen ? "gen" : "";
      if (i in stepOfToken) cls += " step";
      if (i === q) cls += " q";
      if (i === q + 1) cls += " next";
      const j = spanOf(i);
      let style = "";
      if (j >= 0) {
        cls += " sp";
        style += "border-bottom-color:" + SP.colours[j] + ";";
        if (i === SP.ranges[j][0]) {
          htmlText += '<em class=spantag style="color:' + SP.colours[j] + ";border-color:" + SP.colours[j] + '">' +
            esc(SP.names[j]) + "</em>";
        }
      }
      if (m && i <= q) {
        const v = Math.sqrt(m[offsets[step] + i]);
        style += "background:" + ramp(v) + (v > 0.6 ? ";color:#fff" : "");
      }
      htmlText += '<span data-i="' + i + '" class="' + cls.trim() + '"' + (style ? ' style="' + style + '"' : "") +
        ' title="position ' + i + ", id " + D.tokenIds[i] + (j >= 0 ? ", span " + esc(SP.names[j]) : "") + '">' +
        esc(vis(t)) + "</span>";
    });
    strip.innerHTML = htmlText;
    const detail = $("step-detail");
    if (!Q.length) { detail.textContent = "no rows recorded"; return; }
    let rows = "";
    H.forEach(function (h) {
      const mh = matrix(sel[0], h);
      if (!mh) return;
      const row = [];
      for (let k = 0; k <= q; k++) row.push([mh[offsets[step] + k], k]);
      row.sort(function (a, b) { return b[0] - a[0]; });
      const cells = row.slice(0, 3).map(function (x) {
        return "<td>" + x[1] + " \u00ab" + esc(vis(D.tokens[x[1]])) + "\u00bb " + x[0].toFixed(2) + "</td>";
      });
      rows += "<tr><td>L" + sel[0] + " H" + h + " (" + esc(label(sel[0], h).p) + ")</td>" + cells.join("") + "</tr>";
    });
    const produced = q + 1 < D.tokens.length ? vis(D.tokens[q + 1]) : "";
    detail.innerHTML = "<h3>Step " + step + ": query " + q + " \u00ab" + esc(vis(D.tokens[q])) +
      "\u00bb chose token " + (q + 1) + " \u00ab" + esc(produced) + "\u00bb" +
      (q + 1 >= D.promptLen ? " (sampled)" : " (given)") + "</h3><p class=hint>top 3 keys of every head of layer " +
      sel[0] + "</p><table>" + rows + "</table>";
  }
  $("strip").addEventListener("click", function (e) {
    const i = e.target.dataset ? +e.target.dataset.i : NaN;
    if (i in stepOfToken) { step = stepOfToken[i]; refresh(); }
  });

  // ---- wiring -----------------------------------------------------------------------------------
  function select(l, h) { sel = [l, h]; refresh(); }
  function refresh() {
    document.querySelectorAll("#grid .cell").forEach(function (g) {
      g.classList.toggle("sel", +g.dataset.l === sel[0] && +g.dataset.h === sel[1]);
    });
    details(sel[0], sel[1]);
    drawMatrix();
    drawSpans();
    drawStrip();
  }
  document.querySelectorAll("#grid .cell").forEach(function (g) {
    g.addEventListener("click", function () { select(+g.dataset.l, +g.dataset.h); });
    g.addEventListener("mouseenter", function () { details(+g.dataset.l, +g.dataset.h); });
    g.addEventListener("mouseleave", function () { details(sel[0], sel[1]); });
  });
  document.querySelectorAll("td.pick").forEach(function (td) {
    td.addEventListener("click", function () { select(+td.dataset.l, +td.dataset.h); });
  });
  $("colour-by").addEventListener("change", function () { colourBy = $("colour-by").value; recolour(); });
  $("zoom").value = String(zoom);
  if ($("zoom").value !== String(zoom)) {  // a zoom from the URL that the menu lacks
    const o = document.createElement("option"); o.value = String(zoom); o.textContent = zoom + " px";
    $("zoom").appendChild(o); $("zoom").value = String(zoom);
  }
  $("zoom").addEventListener("change", function () { zoom = +$("zoom").value; drawMatrix(); });
  recolour();
  refresh();
  document.body.dataset.rendered = "1";  // lets a headless browser check that the script ran
})();
"""
