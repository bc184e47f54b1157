"""engine/capture/sink.py: span masses, pre-softmax scores, value-weighted norms, character spans, capture that leaves
the computation alone, and the module boundaries (no engine -> inspect import)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM, AttentionCapture, RequestError, SamplingParams, Span, char_spans
from tests.checkpoints import make_checkpoint

PROMPT = list(b"The quick brown fox jumps over the lazy dog")  # byte tokens
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("capture")
    hf = make_checkpoint(out, num_heads=4, num_kv_heads=2, layers=2)
    return LLM(out, dtype="float32", block_size=4), hf


def test_span_masses_are_sums_of_the_rows(tiny):
    llm, _ = tiny
    spans = (Span("quick", 4, 9), Span("fox", 16, 19), Span("dog", 40, 43))
    out = llm.generate(PROMPT, GREEDY, AttentionCapture(spans=spans, rows=True))[0]
    assert len(out.attention) == 4
    for rows in out.attention:
        assert rows.spans.columns == ("quick", "fox", "dog", "generated", "rest_of_prompt")
        for layer, masses in rows.spans.layers.items():
            full = rows.layers[layer]  # [heads, keys]
            want = [full[:, s.start : s.end].sum(1) for s in spans]
            want += [full[:, len(PROMPT):].sum(1)]
            want += [full[:, : len(PROMPT)].sum(1) - sum(want[:3])]
            np.testing.assert_allclose(masses, np.stack(want, axis=1), atol=1e-6)
            np.testing.assert_allclose(masses.sum(1), 1.0, atol=1e-5)
            np.testing.assert_allclose(rows.spans.head_mean()[layer], masses.mean(0))
    assert out.attention[0].spans.layers[0][:, 3].max() == 0  # nothing generated yet at the first step
    only = llm.generate(PROMPT, GREEDY, AttentionCapture(spans=spans, layers=(1,), heads=(2,)))[0]
    assert only.attention[0].layers == {} and only.attention[0].spans.layers[1].shape == (1, 5)
    np.testing.assert_allclose(only.attention[-1].spans.layers[1], out.attention[-1].spans.layers[1][2:3], atol=1e-6)


def test_bad_spans_are_refused(tiny):
    llm, _ = tiny
    for spans, needle in (([Span("a", 0, 5), Span("b", 4, 8)], "overlap"), ([Span("a", 0, 3), Span("a", 5, 8)],
                          "duplicate"), ([Span("a", 40, 99)], "past the prompt")):
        with pytest.raises(RequestError, match=needle):
            llm.generate(PROMPT, GREEDY, AttentionCapture(spans=spans))
    with pytest.raises(RequestError):
        Span("", 0, 1)
    with pytest.raises(RequestError):
        Span("x", 3, 3)
    assert llm.blocks.allocator.num_used == 0


def test_char_spans_cover_the_characters(smollm2_llm):
    tok = smollm2_llm.tokenizer
    text = "Context: Paris is the capital of France. Question: what is the capital of France?"
    start = text.index("Paris")
    ids, [span] = char_spans(tok, text, {"fact": (start, text.index(" Question"))})
    assert ids == tok.encode(text)
    covered = tok.decode(ids[span.start : span.end])
    assert covered.strip() == "Paris is the capital of France." and span.start > 0
    with pytest.raises(RequestError, match="not inside"):
        char_spans(tok, text, {"x": (0, len(text) + 1)})


def test_scores_and_value_norms_match_a_direct_computation(tiny):
    """Pre-softmax scores give the captured rows back through softmax; value-weighted norms equal
    p_j * ||W_O^h v_j|| computed from the reference model's own projections (Kobayashi et al., 2020)."""
    llm, hf = tiny
    cfg = llm.config
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    spec = AttentionCapture(scores=True, value_norms=True)
    out = llm.generate(PROMPT, GREEDY, spec)[0]
    ids = PROMPT + out.token_ids
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for rows in out.attention:
        q = rows.query_position
        for layer in range(cfg.num_hidden_layers):
            probs, scores = rows.layers[layer], rows.scores[layer]
            np.testing.assert_allclose(torch.softmax(torch.tensor(scores), -1).numpy(), probs, atol=1e-5)
            block = hf.model.layers[layer]
            with torch.no_grad():
                v = block.self_attn.v_proj(block.input_layernorm(states[layer][0, : q + 1]))  # [keys, KVH * D]
                w_o = block.self_attn.o_proj.weight  # [hidden, H * D]
                want = np.stack([
                    (v[:, (i // (h // kvh)) * d : (i // (h // kvh) + 1) * d] @ w_o[:, i * d : (i + 1) * d].T).norm(dim=-1)
                    .numpy() for i in range(h)])
            np.testing.assert_allclose(rows.value_norms[layer], probs * want, rtol=1e-4, atol=1e-6)


def test_capture_leaves_every_token_alone(smollm2_llm):
    """Capturing reads the rows beside the fused kernel: the tokens of a capturing request, and of the
    requests batched with it, are those of the run without capture (bfloat16 would show any change)."""
    llm = LLM(smollm2_llm.model_dir, dtype="bfloat16")
    prompts = [llm.tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "Once upon a")]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    plain = [o.token_ids for o in llm.generate(prompts, params)]
    engine = llm.engine
    rids = [engine.add_request(p, params, capture=AttentionCapture(top_k=4) if i == 1 else None)
            for i, p in enumerate(prompts)]
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                got[o.request_id] = o.token_ids
    assert [got[r] for r in rids] == plain


def test_engine_never_imports_inspect():
    """engine/inspect reads the engine; the engine (session included) never imports engine/inspect."""
    root = Path(__file__).resolve().parent.parent / "engine"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("engine.inspect") for n in names), f"{path.name} imports {names}"


def test_session_head_stats_follow_fork_and_rewind(tiny):
    llm, _ = tiny
    with llm.session(PROMPT[:10], capture=AttentionCapture(head_stats=True, value_norms=True)) as s:
        s.step()
        s.feed(PROMPT[10:20])
        assert s.head_stats.n_rows == 11
        child = s.fork()
        child.step()
        assert child.head_stats.n_rows == 12 and s.head_stats.n_rows == 11  # the child's own copy
        s.rewind(5)
        s.feed([ord("x")] * 5)
        assert s.head_stats.token_ids == s.token_ids[: len(s.head_stats.token_ids)]
        assert s.head_stats.n_rows == 16
        last = s.step().attention
        assert last.value_norms[0].shape == last.layers[0].shape
        child.close()


def test_session_spans_count_fed_tokens_as_generated(tiny):
    llm, _ = tiny
    spans = (Span("quick", 4, 9),)
    with llm.session(PROMPT[:12], capture=AttentionCapture(spans=spans, rows=True, layers=(1,))) as s:
        rows = [s.step().attention] + [st.attention for st in s.feed(PROMPT[12:20])] + [s.step().attention]
    for r in rows:
        full, masses = r.layers[1], r.spans.layers[1]
        want = np.stack([full[:, 4:9].sum(1), full[:, 12:].sum(1), full[:, :12].sum(1) - full[:, 4:9].sum(1)], 1)
        np.testing.assert_allclose(masses, want, atol=1e-6)
    assert rows[-1].spans.layers[1][:, 1].min() > 0  # the fed tokens are past the session's prompt


def test_generate_head_stats_with_the_prompt_equal_the_recorders(tiny):
    """With prefill_matrix, a request's statistics count every prompt row too: the same rows, and so the
    same scores, as `kvmini attn`'s recorder (which feeds the prompt token by token)."""
    from engine.inspect import record_prompt

    llm, _ = tiny
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    out = llm.generate(PROMPT, params, AttentionCapture(prefill_matrix=True, head_stats=True))[0]
    dump = record_prompt(llm, PROMPT, AttentionCapture(), max_tokens=5)
    assert dump.token_ids.tolist() == PROMPT + out.token_ids
    assert out.head_stats.n_rows == dump.stats.n_rows == len(PROMPT) + 4
    ours, theirs = out.head_stats.scores(), dump.stats.scores()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-4, err_msg=name)
    plain = llm.generate(PROMPT, params, AttentionCapture(head_stats=True))[0]
    assert plain.head_stats.n_rows == 5  # without the prompt matrix: the rows handed out
