"""engine/capture/head_stats.py: every score on hand-made rows, the online update, the saved state, the labels of a
tiny model whose weights are set by hand (an offset -2 head and a copying head), version-1 dumps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM, AttentionCapture
from engine.capture.head_labels import Thresholds, label_heads, top_heads
from engine.capture.head_stats import LABELS, SCORES, HeadStats, is_separator_text, separator_token_mask
from engine.inspect import load_dump, record_prompt, save_dump
from tests.checkpoints import make_checkpoint, marked_embeddings, write_byte_tokenizer

BOS = 256  # the byte tokenizer's <|endoftext|>
PROMPT = "acebd"  # the copy head's cycle a -> b -> c -> d -> e -> a, listed out of order
CYCLE = "abcde"


# ---- hand-made rows ----------------------------------------------------------------------------------------
def matrix(t: int, rows_of) -> torch.Tensor:
    """`[H, t, t]` causal rows: `rows_of(q)` gives `[H, q + 1]` for query q (normalised here)."""
    first = torch.as_tensor(rows_of(0), dtype=torch.float32)
    out = torch.zeros(first.shape[0], t, t)
    for q in range(t):
        r = torch.as_tensor(rows_of(q), dtype=torch.float32)
        out[:, q, : q + 1] = r / r.sum(-1, keepdim=True)
    return out


def stats_of(m: torch.Tensor, tokens, **kwargs) -> HeadStats:
    """HeadStats of one layer whose heads have the rows `m` [H, T, T], every query 0..T-1."""
    st = HeadStats((0,), range(m.shape[0]), **kwargs)
    st.update(list(range(m.shape[1])), m[None], tokens)
    return st


def spread(q: int, weights: dict[int, float]) -> np.ndarray:
    """A row over keys 0..q: the given keys get their weights, the rest shares what is left evenly."""
    r = np.zeros(q + 1)
    for j, w in weights.items():
        r[j] += w
    rest = [j for j in range(q + 1) if j not in weights]
    left = 1.0 - sum(weights.values())
    if rest:
        r[rest] += left / len(rest)
    elif left > 0:
        r[list(weights)] += left / len(weights)
    return r


def distinct_tokens(n: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).permutation(200)[:n]]


def score(st: HeadStats, name: str, head: int = 0) -> float:
    return st.score(name, 0, head)


def test_global_column_at_any_position():
    t, col = 40, 5
    m = matrix(t, lambda q: np.stack([spread(q, {col: 0.6} if q >= col else {}), spread(q, {})]))
    sep = torch.zeros(256, dtype=torch.bool)
    tokens = distinct_tokens(t)
    sep[tokens[col]] = True  # key 5 is a separator too: on a global column it is not "syntax"
    st = stats_of(m, tokens, separator_mask=sep)
    d = st.details(0, 0)
    assert [c["position"] for c in d["global_columns"]] == [col]
    assert d["global_columns"][0]["token_id"] == tokens[col] and d["global_columns"][0]["mean"] > 0.5
    assert score(st, "global") == pytest.approx(float(m[0, :, col].sum()) / t, abs=1e-6)
    assert score(st, "syntax") == 0.0  # the separator's mass is on a global column
    assert score(st, "sink") < 0.1  # the first token is not the column
    assert st.details(0, 1)["global_columns"] == []  # the uniform head has none (key 0's mean ~ 0.1)
    assert score(st, "syntax", 1) == pytest.approx(float(m[1, :, col].sum()) / t, abs=1e-6)
    labels = {lab.head: lab for lab in label_heads(st)}
    assert labels[0].label == "sink" and labels[1].label == "diffuse"


def test_positional_offset_3_and_previous_token():
    t = 30
    m = matrix(t, lambda q: np.stack([spread(q, {q - 3: 0.7} if q >= 3 else {}),
                                      spread(q, {q - 1: 0.9} if q >= 1 else {})]))
    st = stats_of(m, distinct_tokens(t))
    d = st.details(0, 0)
    assert d["offset"] == 3 and d["offset_shares"][2] == 1.0 and max(d["offset_shares"][:2]) == 0.0
    assert score(st, "positional") == 1.0  # every row with q >= 3 (rows 0..2 cannot have offset 3)
    assert st.details(0, 1)["offset"] == 1 and score(st, "positional", 1) == 1.0
    assert score(st, "prev", 1) == pytest.approx(float(sum(m[1, q, q - 1] for q in range(1, t))) / t, abs=1e-6)
    labels = {lab.head: lab.label for lab in label_heads(st)}
    assert labels == {0: "positional", 1: "previous-token"}


def test_induction_and_duplicate_count_eligible_rows_only():
    k = 10
    body = distinct_tokens(k)
    tokens = [BOS] + body + body  # queries 0..2k
    t = len(tokens)

    def rows(q):
        ind = spread(q, {q - k + 1: 1.0} if q > k else {0: 1.0})  # the token after the earlier copy
        dup = spread(q, {q - k: 1.0} if q > k else {0: 1.0})  # the earlier copy itself
        return np.stack([ind, dup])

    m = matrix(t, rows)
    st = stats_of(m, tokens)
    assert st.n_induction_rows == k  # queries k+1 .. 2k: their token occurred before
    assert score(st, "induction") == pytest.approx(1.0) and score(st, "duplicate", 1) == pytest.approx(1.0)
    assert score(st, "induction_tl") == pytest.approx(k / t)  # TransformerLens divides by every row
    assert score(st, "duplicate_tl", 1) == pytest.approx(k / t)
    assert score(st, "induction", 1) == 0.0 and score(st, "duplicate") == 0.0
    # The induction head copies: queries k+1 .. 2k-1 produce a token whose earlier copy it looks at (the
    # last query's next token is unknown; query k produced the second copy's first token while on BOS).
    assert st.n_copy_rows == k and score(st, "copying") == pytest.approx((k - 1) / k)
    labels = {lab.head: lab for lab in label_heads(st)}
    assert (labels[0].label, labels[0].secondary) == ("induction", "copying")
    assert labels[1].label == "duplicate"


def test_long_range_mass_off_global_columns_and_distance():
    t, far = 60, 20
    m = matrix(t, lambda q: np.stack([spread(q, {q - far: 1.0} if q >= far else {q: 1.0}),
                                      spread(q, {0: 1.0})]))
    st = stats_of(m, distinct_tokens(t))
    n_far = t - far
    assert score(st, "long_range") == pytest.approx(n_far / t)
    assert score(st, "distance") == pytest.approx(far * n_far / t)
    assert score(st, "long_range", 1) == 0.0  # all of head 1's far mass is on its global column (BOS)
    assert score(st, "global", 1) == pytest.approx(1.0) and score(st, "distance", 1) == pytest.approx(
        sum(range(t)) / t)
    labels = {lab.head: lab.label for lab in label_heads(st)}
    assert labels == {0: "long-range", 1: "sink"}
    assert score(st, "long_range") == pytest.approx(stats_of(m, distinct_tokens(t), long_range=far).score(
        "long_range", 0, 0))  # distance >= long_range counts
    assert stats_of(m, distinct_tokens(t), long_range=far + 1).score("long_range", 0, 0) == 0.0


def test_separator_mass():
    t = 40
    tokens = distinct_tokens(t)
    seps = set(range(2, t, 3))  # each one is the latest for 3 rows: 1.5 / (40 - j) < 0.2 wherever 8 rows saw it
    mask = torch.zeros(256, dtype=torch.bool)
    mask[[tokens[j] for j in seps]] = True

    def rows(q):
        recent = max((j for j in seps if j <= q), default=None)
        syntax = spread(q, {recent: 0.5} if recent is not None else {})  # the latest separator
        on_first = spread(q, {2: 1.0} if q >= 2 else {q: 1.0})  # always the first separator: a global column
        return np.stack([syntax, on_first])

    m = matrix(t, rows)
    st = stats_of(m, tokens, separator_mask=mask)
    assert st.details(0, 0)["global_columns"] == []
    expected = float(m[0][:, sorted(seps)].sum()) / t
    assert score(st, "syntax") == pytest.approx(expected, abs=1e-6) and expected > 0.4
    assert [c["position"] for c in st.details(0, 1)["global_columns"]] == [2]
    assert score(st, "syntax", 1) == 0.0
    assert score(st, "syntax", 0) == pytest.approx(
        stats_of(m, tokens, separator_mask=mask.numpy()).score("syntax", 0, 0))  # numpy masks work too
    assert stats_of(m, tokens).score("syntax", 0, 0) == 0.0  # no mask: no separators
    assert {lab.head: lab.label for lab in label_heads(st)} == {0: "syntax", 1: "sink"}


def test_copying_is_the_retrieval_score():
    tokens = [BOS, 5, 6, 7, 5, 8, 6, 9, 7, 5, 6]  # the next token of queries 3, 5, 7, 8, 9 is an earlier token
    t = len(tokens)

    def rows(q):
        nxt = tokens[q + 1] if q + 1 < t else None
        holds = [j for j in range(q + 1) if tokens[j] == nxt]
        return np.stack([spread(q, {holds[-1]: 0.8} if holds else {0: 0.8}),  # points at the next token
                         spread(q, {q: 0.8}),  # self
                         np.ones(q + 1)])  # uniform: flat rows have no strongest key

    m = matrix(t, rows)
    st = stats_of(m, tokens)
    assert st.n_copy_rows == 5
    assert [score(st, "copying", h) for h in range(3)] == [1.0, 0.0, 0.0]
    short = HeadStats((0,), range(3))
    short.update(list(range(t)), m[None], tokens[:t])  # the last query's next token is unknown: not counted
    assert short.n_copy_rows == 5
    labels = {lab.head: lab.label for lab in label_heads(st, Thresholds(min_rows=5))}
    assert labels[0] == "copying" and labels[1] != "copying"
    assert label_heads(st, Thresholds(min_rows=6))[0].label != "copying"  # too few eligible rows to say


def test_entropy_and_self():
    t = 20
    m = matrix(t, lambda q: np.stack([np.ones(q + 1), spread(q, {q: 1.0})]))
    st = stats_of(m, distinct_tokens(t))
    assert score(st, "entropy") == pytest.approx(1.0, abs=1e-6)
    assert score(st, "entropy", 1) == pytest.approx(0.0, abs=1e-6)
    assert score(st, "self", 1) == pytest.approx(1.0) and score(st, "local", 1) == pytest.approx(1.0)
    labels = {lab.head: lab for lab in label_heads(st)}
    assert labels[0].label == "diffuse" and labels[1].label == "self"
    assert labels[1].secondary is None  # local is implied by self, so it is not a second label


def test_a_uniform_head_has_no_global_column_on_a_short_run():
    t = 12  # key 0 gets (1 + 1/2 + ... + 1/12) / 12 = 0.26 of a uniform row on average: above global_mean
    m = matrix(t, lambda q: np.ones((1, q + 1)))
    assert stats_of(m, distinct_tokens(t)).details(0, 0)["global_columns"] == []  # but not twice its share
    assert stats_of(m, distinct_tokens(t), global_lift=0).details(0, 0)["num_global_columns"] == 1


def random_run(seed: int, t: int = 48, heads: int = 3, vocab: int = 6):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (t,), generator=g).tolist()
    logits = torch.randn(2, heads, t, t, generator=g) * 3
    causal = torch.ones(t, t).tril().bool()
    m = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    m[0, 0] = causal / causal.sum(-1, keepdim=True)  # one uniform head
    mask = torch.tensor([i % 3 == 0 for i in range(vocab)])
    return tokens, m, mask


def test_tl_scores_equal_the_dense_formulas():
    tokens, m, _ = random_run(1)
    t = len(tokens)
    st = HeadStats((0, 1), range(3), window=4)
    st.update(list(range(t)), m, tokens)
    a = m.double()
    tok = torch.tensor(tokens)
    dup = (tok[None, :] == tok[:, None]).double().tril(-1)
    ind = torch.zeros_like(dup)
    ind[:, 1:] = dup[:, :-1]
    q, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    patterns = {"sink": (j == 0), "self": (j == q), "prev": (j == q - 1), "local": (q - j < 4) & (j <= q),
                "duplicate_tl": dup, "induction_tl": ind.tril()}
    scores = st.scores()
    for name, pattern in patterns.items():
        ref = (a * pattern.double()).sum((-1, -2)) / a.sum((-1, -2))
        assert np.allclose(scores[name], ref.numpy(), atol=1e-6), name
    eligible = dup.sum(-1) > 0
    ref = (a * ind.tril())[:, :, eligible].sum((-1, -2)) / a[:, :, eligible].sum((-1, -2))
    assert np.allclose(scores["induction"], ref.numpy(), atol=1e-6)


def test_batched_update_equals_one_row_at_a_time():
    tokens, m, mask = random_run(2)
    t = len(tokens)
    one = HeadStats((3, 7), (0, 1, 2), separator_mask=mask, global_rows=4, global_mean=0.1)
    for q in range(t):
        one.update([q], m[:, :, q : q + 1, : q + 1], tokens[: q + 2])
    order = np.random.default_rng(0).permutation(t).tolist()
    many = HeadStats((3, 7), (0, 1, 2), separator_mask=mask, global_rows=4, global_mean=0.1)
    many.update(torch.tensor(order[:30]), m[:, :, order[:30]], tokens)  # any order, padded to C = t
    many.update(order[30:31], m[:, :, order[30:31]], torch.tensor(tokens))
    many.update(order[31:], m[:, :, order[31:]], tokens)
    a, b = one.scores(), many.scores()
    assert a.keys() == set(SCORES)
    for name in SCORES:
        assert np.allclose(a[name], b[name], atol=1e-5), name
    assert any(one.details(3, h)["global_columns"] for h in range(3))  # the comparison covers them
    for h in range(3):
        assert one.details(7, h) == many.details(7, h)
    assert [(x.label, x.secondary) for x in label_heads(one)] == [(x.label, x.secondary) for x in label_heads(many)]


def test_state_round_trips_and_keeps_accumulating():
    tokens, m, mask = random_run(3)
    st = HeadStats((0, 1), range(3), separator_mask=mask)
    st.update(list(range(30)), m[:, :, :30, :30], tokens[:31])
    state = st.state()
    copy = HeadStats.from_state({k: v.copy() for k, v in state.items()})
    assert {k: v.tolist() for k, v in copy.state().items()} == {k: v.tolist() for k, v in state.items()}
    for s in (st, copy):
        s.update([30, 31], m[:, :, 30:32, :32], tokens)
    for name in SCORES:
        assert np.array_equal(st.scores()[name], copy.scores()[name]), name


def test_update_checks_its_input():
    st = HeadStats((0,), (0, 1))
    with pytest.raises(ValueError, match="rows must be"):
        st.update([0], torch.ones(1, 3, 1, 1), [1])
    with pytest.raises(ValueError, match="query positions"):
        st.update([2], torch.ones(1, 2, 1, 2), [1, 2, 3])
    with pytest.raises(ValueError, match="token_ids"):
        st.update([1], torch.ones(1, 2, 1, 2) / 2, [1])
    with pytest.raises(ValueError):
        Thresholds(pattern=0)
    with pytest.raises(ValueError):
        HeadStats((0,), (0,), global_mean=0)


def test_separator_token_mask(tmp_path):
    from engine.text.tokenizer import Tokenizer

    write_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    mask = separator_token_mask(tok, 300)
    assert mask.shape == (300,) and mask.dtype == torch.bool
    for text in (",", " ", "\n", ".", ")"):
        assert mask[tok.encode(text)[0]], text
    for text in ("a", "Z", "7", "+"):
        assert not mask[tok.encode(text)[0]], text
    assert all(mask[i] for i in tok.special_token_ids) and not mask[299]  # past the vocabulary: not one
    assert is_separator_text(" ...") and is_separator_text("\n\n") and not is_separator_text(" the")
    assert not is_separator_text("") and not is_separator_text("\ufffd")


# ---- a tiny model whose weights are set by hand --------------------------------------------------------------
def make_copy_model(out: Path) -> Path:
    """One layer, 4 heads (head_dim 64, one KV head each), tied embeddings, the MLP off, weights set so that:

    * head 0 attends at offset 2 (its output zeroed, so it does not drive the prediction). Embeddings are
      [1, is_bos, unit random vector], so after RMSNorm dim 0 is the same constant for every token; on 8
      rotary pairs m (frequencies t_m from 1 down to 3e-4) the key is (b, 0) and the query
      a(cos 2t_m, -sin 2t_m): with RoPE the score at offset d is ab * sum_m cos(t_m (d - 2)), peaking at 2;
    * head 1 copies by content: on 5 slow rotary pairs (no rotation to speak of over 40 tokens) the key of a
      cycle token is its one-hot code and the query of token x the code of the next token of the cycle
      a -> b -> c -> d -> e -> a (20 logits for a match); one faster pair (t ~ 0.075) adds -6 cos(t d), so of
      several keys holding that token the earliest wins. Its value and output carry the attended key's
      embedding times 10 into the residual, and the tied unembedding then predicts that token: generation
      follows the cycle, each generated token is the argmax key's token, and (the prompt listing the cycle
      out of order) the key it reads is never the induction key;
    * heads 2 and 3 have zero queries (uniform rows) and zero outputs.
    """
    from engine.text.tokenizer import Tokenizer

    hd, n_heads = 64, 4
    model = make_checkpoint(out, layers=1, num_heads=n_heads, num_kv_heads=n_heads, hidden=64, head_dim=hd,
                            tie=True)
    cfg = model.config
    hidden, half = cfg.hidden_size, hd // 2
    emb, freqs, unit = marked_embeddings(cfg, hd, BOS, bos_constant=False)
    q, k, v = (torch.zeros(n_heads * hd, hidden) for _ in range(3))
    o = torch.zeros(hidden, n_heads * hd)
    a = b = 9.0 * math.sqrt(2)  # ab / sqrt(64) = 20 logits at the peak
    for m in range(0, half, 4):  # head 0: offset 2
        q[m, 0] = a * math.cos(2 * freqs[m]) / unit
        q[m + half, 0] = -a * math.sin(2 * freqs[m]) / unit
        k[m, 0] = b / unit
    ids = [Tokenizer.from_dir(out).encode(ch)[0] for ch in CYCLE]
    pinv = torch.linalg.pinv(emb[ids] * unit)  # [hidden, 5]: maps the cycle tokens' inputs to one-hot codes
    nxt = [(i + 1) % len(ids) for i in range(len(ids))]
    base = hd  # head 1
    for i in range(len(ids)):  # key of token i: its code; query of token i: the code of next(i)
        k[base + half - 7 + i] = 10.0 * pinv[:, i]
        q[base + half - 7 + nxt[i]] = 16.0 * pinv[:, i]
    amp = math.sqrt(6.0 * math.sqrt(hd))
    q[base + 9, 0] = -amp / unit  # pair 9: -a'b' cos(t_9 d)
    k[base + 9, 0] = amp / unit
    v[base : base + hd] = torch.eye(hidden)
    o[:, base : base + hd] = torch.eye(hidden) * 10.0 / unit
    layer = model.model.layers[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        layer.input_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        layer.self_attn.q_proj.weight.copy_(q)
        layer.self_attn.k_proj.weight.copy_(k)
        layer.self_attn.v_proj.weight.copy_(v)
        layer.self_attn.o_proj.weight.copy_(o)
        layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def copy_dump(tmp_path_factory):
    llm = LLM(make_copy_model(tmp_path_factory.mktemp("copy")))
    ids = [BOS] + llm.tokenizer.encode(PROMPT)
    return record_prompt(llm, ids, AttentionCapture(), max_tokens=30, info={"model": "copy"})


def test_hand_made_offset_and_copying_heads_get_their_labels(copy_dump):
    d = copy_dump
    text = "".join(d.token_texts[1:])
    assert text.startswith(PROMPT + "eabcdeabcd")  # generation follows the copy head's cycle
    heads = {lab.head: lab for lab in label_heads(d.stats)}
    assert heads[0].label == "positional" and heads[0].detail["offset"] == 2 and heads[0].score > 0.9
    assert heads[1].label == "copying" and heads[1].score == 1.0
    assert heads[2].label == heads[3].label == "diffuse"
    for h in (0, 2, 3):
        assert "copying" not in (heads[h].label, heads[h].secondary)
    for h in (1, 2, 3):
        assert not {"positional", "previous-token"} & {heads[h].label, heads[h].secondary}
    # Each generated token is the token of the copy head's strongest key; that key is not the induction key.
    m = d.matrix(0, 1)
    for s, q in enumerate(d.query_positions):
        if q >= d.prompt_len - 1 and q + 1 < len(d.token_ids):
            assert d.token_ids[int(m[s].argmax())] == d.token_ids[q + 1]
    assert heads[1].scores["induction"] < 0.3 and heads[1].scores["positional"] < 0.5
    assert [x[:2] for x in top_heads(d.stats, "copying", 1)] == [(0, 1)]


def test_version_1_dump_recomputes_the_statistics(copy_dump, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = save_dump(copy_dump, tmp_path / "v2.safetensors")
    with safe_open(str(path), framework="np") as f:
        header = json.loads(f.metadata()["kvmini.attention"])
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("stats.")}
    n = (len(copy_dump.layers), len(copy_dump.heads))
    tensors |= {"stats_mass": np.zeros((*n, 6)), "stats_total": np.ones(n), "stats_spread": np.zeros((*n, 2))}
    header |= {"version": 1, "stats": {"window": 4, "n_rows": 1, "n_spread_rows": 1,
                                       "patterns": ["sink", "self", "prev", "local", "duplicate", "induction"],
                                       "spread": ["entropy", "distance"]}}
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={"kvmini.attention": json.dumps(header, sort_keys=True)})
    again = load_dump(old)
    assert again.stats is not None
    live, recomputed = copy_dump.stats.scores(), again.stats.scores()
    for name in SCORES:  # from float16 rows instead of float32 ones
        assert np.allclose(live[name], recomputed[name], atol=0.01, rtol=0.01), name
    assert [x.label for x in label_heads(again.stats)] == [x.label for x in label_heads(copy_dump.stats)]
    v2 = load_dump(path)
    assert all(np.array_equal(a, b) for a, b in zip(v2.stats.state().values(), copy_dump.stats.state().values()))
    assert set(LABELS) >= {x.label for x in label_heads(v2.stats)}
