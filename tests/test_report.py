"""The HTML report: legend of every label, colour scale in score mode, the span view, readable key labels at
150+ tokens (in a real headless Chromium), and `kvmini attn --span`."""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from html.parser import HTMLParser

import numpy as np
import pytest

from engine.capture import head_stats
from engine.inspect import report
from engine.inspect.cli import check_spans, main, span_arg
from engine.inspect.dump import AttentionDump, TopKRows
from engine.inspect.report import LABEL_COLOURS, label_abbrev, label_colour, legend_labels, render_report, span_masses
from tests.browser import chromium

WORDS = "the quick brown fox jumps over lazy dog , . and then it sleeps under a big green tree while".split()
SPANS = [{"name": "doc1", "start": 1, "end": 20}, {"name": "doc2", "start": 60, "end": 100}]


def synthetic_dump(n_tokens: int = 170, prompt_len: int = 150, top_k: int | None = None, spans=SPANS,
                   n_layers: int = 2) -> AttentionDump:
    """Every token but the last is a query; head 0 looks one back, 1 uniformly, 2 mostly at BOS, 3 at itself
    and the first 20 keys. Built without a model, so the report is tested on its own."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(WORDS), n_tokens)
    ids[0] = len(WORDS)
    texts = ["<|im_start|>"] + [" " + WORDS[i] for i in ids[1:]]
    if n_tokens > 40:
        texts[40] = " antidisestablishmentarianism"  # a long token: its label is truncated, full text on hover
    n_heads, queries = 4, np.arange(n_tokens - 1)
    rows = []
    for q in queries:
        r = np.zeros((n_layers, n_heads, q + 1))
        r[:, 0, max(q - 1, 0)] = 1.0
        r[:, 1, :] = 1.0 / (q + 1)
        r[:, 2, 0] = 0.8
        r[:, 2, :] += 0.2 / (q + 1)
        r[:, 3, q] = 0.6
        r[:, 3, : min(q + 1, 20)] += 0.4 / min(q + 1, 20)
        rows.append(r)
    offsets = np.concatenate([[0], np.cumsum(queries + 1)]).astype(np.int64)
    keys = np.concatenate([np.arange(q + 1) for q in queries]).astype(np.int32)
    values = topk = None
    if top_k is None:
        values = np.concatenate(rows, axis=-1).astype(np.float16)
    else:
        pos = np.full((n_layers, n_heads, len(queries), top_k), -1, np.int32)
        val = np.zeros(pos.shape, np.float16)
        left = np.zeros(pos.shape[:3], np.float32)
        for s, r in enumerate(rows):
            idx = np.argsort(-r, axis=-1, kind="stable")[..., :top_k]
            v = np.take_along_axis(r, idx, -1)
            pos[:, :, s, : idx.shape[-1]], val[:, :, s, : idx.shape[-1]] = idx, v
            left[:, :, s] = np.clip(1 - v.sum(-1), 0, 1)
        topk = TopKRows(pos, val, left)
    info = {"model": "synthetic"} | ({"spans": spans} if spans else {})
    return AttentionDump(
        token_ids=ids.astype(np.int32), token_texts=texts, prompt_len=prompt_len, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=2, kv_group=np.arange(n_heads, dtype=np.int32) // 2,
        layers=tuple(range(n_layers)), heads=tuple(range(n_heads)), query_positions=queries.astype(np.int32),
        row_offsets=offsets, key_positions=keys, values=values, topk=topk, stats=None, info=info)


@pytest.fixture(scope="module")
def dump() -> AttentionDump:
    d = synthetic_dump()
    d.stats = d.recompute_stats()  # once for every test below
    return d


# ---- legend and labels -----------------------------------------------------------------------------------
def test_legend_lists_every_label_with_its_colour(dump):
    page = render_report(dump)
    parsed = _parse(page)
    assert set(head_stats.LABELS) <= set(parsed.legend), parsed.legend  # every label the labeller gives
    for name, colour in parsed.legend.items():
        assert re.fullmatch(r"#[0-9a-f]{6}", colour) and colour == label_colour(name)
    payload = _payload(page)
    for row in payload["labels"]:  # every head's primary label has a legend entry, hence a colour
        for cell in row:
            assert cell["p"] in parsed.legend and cell["p"] in payload["colours"]
    assert len(parsed.cells) == len(dump.layers) * len(dump.heads)


@dataclass(frozen=True)
class _Label:  # duck-typed HeadLabel, so the report is tested whatever the labeller says today
    layer: int
    head: int
    label: str
    score: float
    scores: dict
    secondary: str | None = None
    detail: dict = field(default_factory=dict)


def test_unknown_labels_secondaries_and_offsets(dump, monkeypatch):
    scores = dump.stats.scores()

    def fake(stats, thresholds=None):
        out, kinds = [], [("positional", "sink", {"offset": 3}), ("brand-new-label", None, {}),
                          ("induction", "previous-token", {"offset": 1}), ("long_range", "mystery", {})]
        for li, layer in enumerate(stats.layers):
            for hi, head in enumerate(stats.heads):
                label, sec, detail = kinds[hi % len(kinds)]
                detail = detail | {"global_columns": [{"position": 0, "token_id": 5, "mean": 0.8}]}
                s = {n: float(v[li, hi]) for n, v in scores.items()}
                out.append(_Label(layer, head, label, float("nan") if hi == 1 else 0.5, s, sec, detail))
        return out

    monkeypatch.setattr(report, "label_heads", fake)
    page = render_report(dump)
    parsed = _parse(page)
    assert parsed.cells[(0, 0)] == "p-3" and parsed.secondaries[(0, 0)] == "snk"
    assert parsed.cells[(0, 1)] == label_abbrev("brand-new-label") == "bra"
    assert parsed.cells[(0, 2)] == "ind" and parsed.secondaries[(0, 2)] == "prv"
    assert parsed.cells[(0, 3)] == "lng" and label_colour("long_range") == LABEL_COLOURS["long-range"]
    for name in ("brand-new-label", "mystery", "long_range"):  # labels no list names still get a colour
        assert name in parsed.legend and re.fullmatch(r"#[0-9a-f]{6}", parsed.legend[name])
    assert label_colour("brand-new-label") == label_colour("brand-new-label")  # stable across runs
    assert "positional (offset \u22123)" in page and "0 \u00ab&lt;|im_start|&gt;\u00bb" in page  # tooltip detail
    assert legend_labels(fake(dump.stats))[: len(head_stats.LABELS)] == list(head_stats.LABELS)
    json.loads(_payload_text(page))  # the NaN score became null: the payload is still JSON


# ---- colour scale ----------------------------------------------------------------------------------------
def test_colour_scale_in_score_mode(dump):
    label_page = _parse(render_report(dump))
    assert label_page.scale_hidden and not label_page.ticks and not label_page.legend_hidden
    unit = _parse(render_report(dump, colour_by="induction"))
    assert not unit.scale_hidden and unit.legend_hidden
    assert unit.ticks == ["0", "0.25", "0.5", "0.75", "1"]
    page = render_report(dump, colour_by="distance")  # not a fraction: the scale runs to the largest value
    far = _parse(page)
    top = max(float(v) for row in _payload(page)["scores"]["distance"] for v in row if v is not None)
    assert far.ticks[0] == "0" and float(far.ticks[-1]) == pytest.approx(top, abs=0.51) and top > 1
    assert 'value="distance" selected' in page
    # the script hides the legend or the scale with `hidden`: their display rules must not override it
    assert "ul.legend[hidden]{display:none}" in page and ".scale[hidden]{display:none}" in page
    with pytest.raises(ValueError, match="colour_by"):
        render_report(dump, colour_by="no-such-score")


# ---- spans -----------------------------------------------------------------------------------------------
def _expected_masses(d: AttentionDump) -> np.ndarray:
    """Straight from the dense matrices: per layer, head and step, the mass on each bucket."""
    out = np.zeros((len(d.layers), len(d.heads), d.num_steps, len(SPANS) + 3))
    for li, layer in enumerate(d.layers):
        for hi, head in enumerate(d.heads):
            m = d.matrix(layer, head).astype(np.float64)
            for b, sp in enumerate(SPANS):
                out[li, hi, :, b] = m[:, sp["start"] : sp["end"]].sum(1)
            out[li, hi, :, len(SPANS)] = m[:, d.prompt_len :].sum(1)
            out[li, hi, :, len(SPANS) + 1] = m[:, : d.prompt_len].sum(1) - out[li, hi, :, : len(SPANS)].sum(-1)
    return out


def test_span_masses_full_rows_are_exact(dump):
    view = span_masses(dump)
    assert view.names == ["doc1", "doc2"] and view.ranges == [(1, 20), (60, 100)] and not view.notes
    assert view.buckets == ["doc1", "doc2", "generated", "rest of prompt", "unknown"]
    assert np.allclose(view.masses, _expected_masses(dump), atol=1e-5)
    assert np.all(view.masses[..., -1] == 0)  # full rows: nothing unknown
    assert np.allclose(view.masses.sum(-1), 1.0, atol=2e-3)  # float16 rows
    # the previous-token head (0) at query q puts everything on key q - 1
    q = dump.query_positions
    prev_bucket = np.select([(q - 1 >= 1) & (q - 1 < 20), (q - 1 >= 60) & (q - 1 < 100), q - 1 >= 150], [0, 1, 2], 3)
    assert np.array_equal(view.masses[0, 0, 1:].argmax(-1), prev_bucket[1:])
    # the page carries the same numbers (uint16), and the head average after the heads
    sp = _payload(render_report(dump))["spans"]
    raw = np.frombuffer(base64.b64decode(sp["masses"]), "<u2").astype(np.float64) / 65535
    data = raw.reshape(len(dump.layers), len(dump.heads) + 1, dump.num_steps, 5)
    assert sp["perHead"] and sp["names"] == ["doc1", "doc2"] and sp["ranges"] == [[1, 20], [60, 100]]
    assert np.allclose(data[:, :-1], view.masses, atol=1 / 65535)
    assert np.allclose(data[:, -1], view.masses.mean(1), atol=1 / 65535)
    small = _payload(render_report(dump, span_budget=1000))["spans"]  # over budget: head averages only
    assert not small["perHead"] and len(base64.b64decode(small["masses"])) == 2 * len(dump.layers) * dump.num_steps * 5


def test_span_masses_top_k_leave_the_rest_unknown():
    d = synthetic_dump(top_k=3)
    view = span_masses(d)
    assert np.allclose(view.masses[..., -1], d.topk.leftover)
    assert np.allclose(view.masses.sum(-1), 1.0, atol=2e-3)
    full = span_masses(synthetic_dump())
    # the uniform head keeps 3 keys of many: most of its mass is unknown; the previous-token head keeps it all
    assert view.masses[0, 1, -1, -1] > 0.9 and np.allclose(view.masses[0, 0, 1:], full.masses[0, 0, 1:], atol=2e-3)
    page = render_report(d)
    assert "from the stored top-k entries" in page and ">unknown</li>" in page


def test_bad_spans_are_dropped_with_a_note_and_no_spans_no_section():
    bad = [{"name": "a", "start": 5, "end": 10}, {"name": "b", "start": 8, "end": 12},
           {"name": "c", "start": 160, "end": 999}, {"oops": 1}]
    view = span_masses(synthetic_dump(spans=bad, n_tokens=40, prompt_len=30))
    assert view.names == ["a"] and len(view.notes) == 3
    page = render_report(synthetic_dump(spans=bad, n_tokens=40, prompt_len=30))
    assert "overlaps an earlier span" in page and "not inside the 40 tokens" in page
    plain = render_report(synthetic_dump(spans=None, n_tokens=40, prompt_len=30))
    assert "id=spans" not in plain and _payload(plain)["spans"] is None


# ---- kvmini attn --span ----------------------------------------------------------------------------------
def test_span_option_parsing_and_checks():
    assert span_arg("doc1:0:40") == {"name": "doc1", "start": 0, "end": 40}
    assert span_arg("a:b:3:7") == {"name": "a:b", "start": 3, "end": 7}
    for bad in ("doc", "doc:1", "doc:x:4", ":1:4", "doc:5:5", "doc:-1:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            span_arg(bad)
    ok = [span_arg("a:0:4"), span_arg("b:4:9")]
    assert check_spans(ok, 9) == ok
    with pytest.raises(ValueError, match="not inside the prompt"):
        check_spans(ok, 8)
    with pytest.raises(ValueError, match="overlap"):
        check_spans([span_arg("a:0:5"), span_arg("b:4:9")], 20)
    with pytest.raises(ValueError, match="distinct"):
        check_spans([span_arg("a:0:2"), span_arg("a:4:9")], 20)


def test_cli_span_reaches_the_dump_and_the_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.checkpoints import make_checkpoint

    model = tmp_path / "tiny"
    make_checkpoint(model, layers=1)
    text = "The cat sat on the mat. The dog"  # byte tokenizer: one token per character
    out, dump_file = tmp_path / "r.html", tmp_path / "r.safetensors"
    assert main(["attn", "--model", str(model), "--prompt", text, "--max-tokens", "3", "--span", "cat:4:7",
                 "--span", "mat:19:22", "--out", str(out), "--save-dump", str(dump_file)]) == 0
    from engine.inspect import load_dump

    loaded = load_dump(dump_file)
    assert loaded.info["spans"] == [{"name": "cat", "start": 4, "end": 7}, {"name": "mat", "start": 19, "end": 22}]
    assert "id=spans" in out.read_text() and span_masses(loaded).names == ["cat", "mat"]
    # spans can be given afresh when reading a dump
    again = tmp_path / "again.html"
    assert main(["attn", "--dump", str(dump_file), "--span", "dog:27:31", "--out", str(again)]) == 0
    assert _payload(again.read_text())["spans"]["names"] == ["dog"]
    capsys.readouterr()
    # errors are clear, and come before any model work
    assert main(["attn", "--model", str(model), "--prompt", text, "--span", "x:0:99"]) == 2
    assert "span x [0, 99) is not inside the prompt (positions 0..30, 31 tokens)" in capsys.readouterr().err
    assert main(["attn", "--dump", str(dump_file), "--span", "a:0:5", "--span", "b:3:8"]) == 2
    assert "overlap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attn", "--dump", str(dump_file), "--span", "nope"])
    assert "NAME:START:END" in capsys.readouterr().err


# ---- a real browser --------------------------------------------------------------------------------------

def test_long_run_renders_readably_in_headless_chromium(dump, tmp_path):
    """170 tokens: the script runs, cells keep a minimum size (the box scrolls), key labels are thinned so
    that neighbours never overlap, the scale and the span view are drawn."""
    browser = chromium()
    page = tmp_path / "long.html"
    page.write_text(render_report(dump), encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000"]
    url = page.as_uri() + "#colour=induction&head=1,3&step=155"
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([*flags, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=90, check=False).stdout
    assert 'data-rendered="1"' in dom
    wrap = re.search(r'<div id="mwrap"[^>]*>', dom)[0]
    cell, every = int(re.search(r'data-cell="(\d+)"', wrap)[1]), int(re.search(r'data-every-key="(\d+)"', wrap)[1])
    assert cell >= 8 and every * cell * np.sin(np.pi / 3) >= 13  # 11 px labels at 60 degrees do not overlap
    size = re.search(r'<canvas id="matrix" width="(\d+)" height="(\d+)"', dom)
    assert int(size[1]) == 170 * cell - cell and int(size[2]) == dump.num_steps * cell
    # score mode from the URL: the scale is shown with its numbers, the label legend hidden
    scale = re.search(r'<div id="scale" class="scale">(.*?)</div>', dom, re.DOTALL)
    assert scale and re.findall(r'class="tick"[^>]*>([^<]+)<', scale[1]) == ["0", "0.25", "0.5", "0.75", "1"]
    assert re.search(r'<ul id="legend" class="legend" hidden', dom)
    # span view: the step table, with this step's numbers for the chosen head
    table = re.search(r'<div id="span-step">(.*?)</div>', dom, re.DOTALL)[1]
    assert "Step 155" in table and 'data-bucket="doc1"' in table and 'data-bucket="unknown"' not in table
    view = span_masses(dump)
    doc2 = re.search(r'data-bucket="doc2">.*?</th><td class="num">[^<]*</td><td class="num">([\d.]+)%', table)
    assert float(doc2[1]) == pytest.approx(100 * view.masses[1, 3, 155, 1], abs=0.06)
    marked = re.findall(r'<span data-i="\d+" class="[^"]*\bsp\b', dom)
    assert dom.count('class="spantag"') == 2 and len(marked) == 19 + 40  # spans marked in the token strip
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*flags, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                       capture_output=True, timeout=90, check=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_top_k_report_renders_in_headless_chromium(tmp_path):
    browser = chromium()
    page = tmp_path / "topk.html"
    page.write_text(render_report(synthetic_dump(top_k=3, n_tokens=60, prompt_len=50,
                                                 spans=[{"name": "a", "start": 1, "end": 9}])), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=90, check=False).stdout
    assert 'data-rendered="1"' in dom and 'data-bucket="unknown"' in dom


# ---- helpers ---------------------------------------------------------------------------------------------
def _payload_text(page: str) -> str:
    return re.search(r'<script type="application/json" id=data>(.*?)</script>', page, re.DOTALL)[1]


def _payload(page: str) -> dict:
    return json.loads(_payload_text(page))


class _Page(HTMLParser):
    """The legend (label -> colour), the grid cells' primary and secondary abbreviations, the scale."""

    def __init__(self):
        super().__init__()
        self.legend: dict[str, str] = {}
        self.cells: dict[tuple[int, int], str] = {}
        self.secondaries: dict[tuple[int, int], str] = {}
        self.ticks: list[str] = []
        self.scale_hidden = self.legend_hidden = False
        self._key = self._cell = None
        self._where = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class") or ""
        if tag == "ul" and a.get("id") == "legend":
            self.legend_hidden = "hidden" in a
        if tag == "li" and "key" in cls and "data-label" in a:
            self._key = a["data-label"]
        if tag == "i" and self._key is not None:
            self.legend[self._key] = re.search(r"background:\s*(#[0-9a-f]+)", a.get("style", ""))[1]
        if tag == "div" and a.get("id") == "scale":
            self.scale_hidden = "hidden" in a
        if tag == "g" and "cell" in cls:
            self._cell = (int(a["data-l"]), int(a["data-h"]))
        self._where = None
        if tag == "text" and self._cell is not None:
            self._where = "cell"
        elif tag == "tspan" and self._cell is not None and "sec" in cls:
            self._where = "sec"
        elif tag == "span" and "tick" in cls:
            self._where = "tick"

    def handle_endtag(self, tag):
        if tag == "g":
            self._cell = None
        if tag == "li":
            self._key = None
        self._where = None

    def handle_data(self, data):
        if self._where == "cell":
            self.cells[self._cell] = data
        elif self._where == "sec":
            self.secondaries[self._cell] = data
        elif self._where == "tick":
            self.ticks.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def test_page_has_no_external_resource(dump):
    """Token text is data, never markup, here too: in the span legend, tooltips and the payload."""
    page = render_report(replace(dump, token_texts=['</script><img src="http://x/y.png">'] * len(dump.token_ids)))
    assert "<img" not in page and page.count("<script") == 2 and "url(" not in page and "<link" not in page
