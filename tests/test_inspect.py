"""Attention inspection: dumps, head statistics and labels, the induction probe, the HTML report, `kvmini attn`."""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM, AttentionCapture
from engine.capture.head_labels import label_heads, top_heads
from engine.inspect import Probe, dump_session, load_dump, record_prompt, run_probe, save_dump
from engine.inspect.cli import index_list, main
from engine.inspect.report import render_report
from tests.browser import chromium
from tests.checkpoints import make_checkpoint, marked_embeddings

BOS = 256  # the byte tokenizer's <|endoftext|>, the tiny checkpoints' bos_token_id
TEXT = "The quick brown fox jumps over the lazy dog, then it sleeps."


def make_pattern_model(out: Path) -> Path:
    """One layer, 4 query heads over 2 KV heads (head_dim 16), weights set by hand so that:

    * head 0 attends to the previous token, head 2 to the first token (BOS), heads 1 and 3 uniformly.

    Every embedding is [1, is_bos, unit random vector]: the same norm for all tokens, so after RMSNorm dim 0 is
    the same constant everywhere and dim 1 marks BOS. Projections read only those dims:
    * head 0 / KV head 0 (previous token): in every rotary pair m (frequency t_m) the key is (b, 0) and the
      query a(cos t_m, -sin t_m). With RoPE the score at offset d = i - j is ab * sum_m cos(t_m (d - 1)), which
      peaks at d = 1 and, with ab = 81 and 8 pairs, beats d = 0 and d = 2 by about 10 logits after 1/sqrt(16);
    * head 2 / KV head 1 (first token): only the slowest pair (t_7 ~ 3e-4, nearly no rotation) with the key
      nonzero on BOS alone, so BOS scores ~20 logits and every other key 0;
    * heads 1 and 3 have zero queries, so every score is 0 and the rows are uniform.
    """
    model = make_checkpoint(out, layers=1, num_heads=4, num_kv_heads=2, hidden=64)
    cfg = model.config
    hidden, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    half = hd // 2
    emb, freqs, unit = marked_embeddings(cfg, hd, BOS)
    a = b = 9.0
    q = torch.zeros(cfg.num_attention_heads * hd, hidden)
    k = torch.zeros(cfg.num_key_value_heads * hd, hidden)
    for m in range(half):  # head 0 and KV head 0: previous token
        q[m, 0] = a * math.cos(freqs[m]) / unit
        q[m + half, 0] = -a * math.sin(freqs[m]) / unit
        k[m, 0] = b / unit
    q[2 * hd + half - 1, 0] = a / unit  # head 2, slowest pair
    k[hd + half - 1, 1] = b / unit  # KV head 1 reads the BOS marker
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        attn.q_proj.weight.copy_(q)
        attn.k_proj.weight.copy_(k)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pattern_llm(tmp_path_factory) -> LLM:
    return LLM(make_pattern_model(tmp_path_factory.mktemp("pattern")))


@pytest.fixture(scope="module")
def pattern_ids(pattern_llm) -> list[int]:
    return [BOS] + pattern_llm.tokenizer.encode(TEXT)


@pytest.fixture(scope="module")
def pattern_dump(pattern_llm, pattern_ids):
    """The prompt forced token by token, then 4 sampled tokens (so prefill and decode rows are both in)."""
    return record_prompt(pattern_llm, pattern_ids, AttentionCapture(), max_tokens=4, info={"model": "pattern"})


def test_hand_made_heads_get_their_labels(pattern_dump):
    labels = {(lab.layer, lab.head): lab for lab in label_heads(pattern_dump.stats)}
    assert {k: v.label for k, v in labels.items()} == {
        (0, 0): "previous-token", (0, 1): "diffuse", (0, 2): "sink", (0, 3): "diffuse",
    }
    assert labels[(0, 0)].scores["prev"] > 0.95 and labels[(0, 2)].scores["sink"] > 0.95
    assert labels[(0, 1)].scores["entropy"] == pytest.approx(1.0, abs=1e-6)  # uniform rows
    assert pattern_dump.num_steps == len(pattern_dump.token_ids) - 1  # every token but the last was a query
    assert len(pattern_dump.token_ids) == 1 + len(TEXT) + 4


def test_report_is_self_contained_and_shows_the_labels(pattern_dump):
    page = render_report(pattern_dump)
    parsed = _parse(page)
    external = [v for v in parsed.links if v.lower().startswith(("http:", "https:", "//"))]
    assert not external and "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page  # no fetched resource at all
    assert parsed.cells == {(0, 0): "prv", (0, 1): "dif", (0, 2): "snk", (0, 3): "dif"}
    assert parsed.scripts == 2  # the JSON payload and the inline script, neither with a src
    # Token text is data, never markup: a hostile "token" neither closes the script nor adds a fetch.
    hostile = replace(pattern_dump, token_texts=['</script><img src="http://x/y.png">'] * len(pattern_dump.token_ids))
    parsed = _parse(render_report(hostile))
    assert parsed.scripts == 2 and not parsed.links


def test_report_renders_in_headless_chromium(pattern_dump, tmp_path):
    browser = chromium()
    page = tmp_path / "report.html"
    page.write_text(render_report(pattern_dump), encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([*flags, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=90)
    assert 'data-rendered="1"' in dom.stdout, dom.stderr[-2000:]  # the script ran to its last line
    size = re.search(r'<canvas id="matrix" width="(\d+)" height="(\d+)"', dom.stdout)
    assert size and min(int(size[1]), int(size[2])) > 100  # the heatmap was drawn (10 x 10 until then)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*flags, f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,1000",
                        page.as_uri()], capture_output=True, timeout=90)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_top_k_rows_plus_leftover_sum_to_one(pattern_llm, pattern_ids, tmp_path):
    capture = AttentionCapture(heads=(0, 2, 3))
    dump = record_prompt(pattern_llm, pattern_ids, capture, max_tokens=2, top_k=3)
    t = dump.topk
    assert dump.mode == "topk" and dump.heads == (0, 2, 3) and t.positions.shape[-1] == 3
    totals = t.values.astype(np.float32).sum(-1) + t.leftover
    assert np.allclose(totals, 1.0, atol=2e-3)  # float16 values, float32 leftover
    assert np.all(t.positions[:, :, 0, 1:] == -1)  # the first row has one key: the rest is padding
    full = record_prompt(pattern_llm, pattern_ids, capture, max_tokens=2)
    assert np.array_equal(dump.matrix(0, 0).argmax(1), full.matrix(0, 0).argmax(1))
    loaded = load_dump(save_dump(dump, tmp_path / "topk.safetensors"))
    assert np.array_equal(loaded.topk.positions, t.positions) and np.array_equal(loaded.topk.leftover, t.leftover)


def test_session_dump_round_trips_bit_exactly(pattern_llm, pattern_ids, tmp_path):
    with pattern_llm.session(pattern_ids[:3], capture=AttentionCapture(layers=(0,))) as s:
        s.step()  # prefill of the 3 prompt tokens: one row (query 2)
        s.feed(pattern_ids[3:12])
        for _ in range(3):
            s.step()
        child = s.fork()
        child.step()
        assert len(s.attention_log) == 13 and len(child.attention_log) == 14
        first = tmp_path / "a.safetensors"
        dump_session(s, first)
        live = {r.query_position: r.layers[0] for r in s.attention_log}
    dump = load_dump(first)
    assert list(dump.query_positions) == sorted(live) and dump.prompt_len == 3
    for step, q in enumerate(dump.query_positions):  # what was stored is the live row in float16
        assert np.array_equal(dump.values[0, :, dump.row_offsets[step] : dump.row_offsets[step + 1]],
                              live[int(q)].astype(np.float16))
    second = save_dump(dump, tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()
    again = load_dump(second)
    a, b = again.stats.state(), dump.stats.state()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert again.token_texts == dump.token_texts


def test_cli_report_from_a_dump_equals_the_live_one(pattern_llm, tmp_path, capsys):
    model = str(pattern_llm.model_dir)
    live, saved, dump_file = tmp_path / "live.html", tmp_path / "saved.html", tmp_path / "run.safetensors"
    assert main(["attn", "--model", model, "--prompt", TEXT, "--max-tokens", "3", "--save-dump", str(dump_file),
                 "--out", str(live)]) == 0
    assert main(["attn", "--dump", str(dump_file), "--out", str(saved)]) == 0
    assert live.read_text() == saved.read_text()
    out = capsys.readouterr().out
    assert "top induction:" in out and "wrote" in out
    assert main(["attn", "--dump", str(dump_file), "--layers", "0"]) == 2  # selection only applies to a run
    assert index_list("0,3,5-7") == (0, 3, 5, 6, 7)


def test_cli_png(pattern_llm, tmp_path):
    pytest.importorskip("matplotlib", reason="PNG output needs the optional 'plot' extra (matplotlib)")
    model = str(pattern_llm.model_dir)
    assert main(["attn", "--model", model, "--probe", "--probe-length", "12", "--png", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "scores.png" in pngs and len(pngs) >= 2


@pytest.mark.real
def test_probe_induction_heads_match_transformers(smollm2_llm, smollm2_hf):
    probe = Probe(length=50, seed=0)
    ids = probe.token_ids(smollm2_llm)
    assert ids[0] == 1 and ids[1:51] == ids[51:]
    dump = run_probe(smollm2_llm, probe)
    ours = top_heads(dump.stats, "induction_tl", 5)
    # The same score from transformers' eager attentions: TransformerLens' induction pattern, "mul" measure,
    # over the same query rows (the probe's last token is never a query, so drop it).
    with torch.no_grad():
        att = smollm2_hf(torch.tensor([ids[:-1]]), output_attentions=True).attentions
    a = torch.stack([x[0] for x in att]).double()  # [layers, heads, q, k]
    tok = torch.tensor(ids[:-1])
    duplicate = (tok[None, :] == tok[:, None]).double().tril(-1)
    induction = torch.zeros_like(duplicate)
    induction[:, 1:] = duplicate[:, :-1]
    scores = (a * induction.tril()).sum((-1, -2)) / a.sum((-1, -2))
    best = torch.argsort(scores.flatten(), descending=True, stable=True)[:5].tolist()
    assert [(layer, head) for layer, head, _ in ours] == [divmod(i, a.shape[1]) for i in best]
    assert np.allclose([v for *_, v in ours], scores.flatten()[best].numpy(), atol=1e-4)
    assert ours[0][2] > 0.4
    # Measured over the rows where induction can happen (the second copy), those five heads are labelled
    # induction, with copying second (an induction head's strongest key holds the token that comes next).
    five = {(17, 3), (17, 4), (17, 5), (18, 6), (18, 7)}
    assert {(layer, head) for layer, head, _ in ours} == five
    labels = {(lab.layer, lab.head): lab for lab in label_heads(dump.stats)}
    for key in five:
        assert (labels[key].label, labels[key].secondary) == ("induction", "copying"), labels[key]
        # Eligible rows: the second copy's queries but the last token, which is never a query.
        assert labels[key].score > 0.6 and labels[key].detail["induction_rows"] == probe.length - 1
    assert {x[:2] for x in top_heads(dump.stats, "induction", 5)} == five


# ---- helpers ---------------------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Collects link-like attributes, script tags and the grid cells' labels."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.scripts = 0
        self.cells: dict[tuple[int, int], str] = {}
        self._cell = None
        self._in_cell_text = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href", "action", "data", "poster") and v]
        if tag == "script":
            assert "src" not in a
            self.scripts += 1
        if tag == "g" and "cell" in (a.get("class") or ""):
            self._cell = (int(a["data-l"]), int(a["data-h"]))
        self._in_cell_text = tag == "text" and self._cell is not None

    def handle_endtag(self, tag):
        if tag == "g":
            self._cell = None
        self._in_cell_text = False

    def handle_data(self, data):
        if self._in_cell_text:
            self.cells[self._cell] = data


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p
