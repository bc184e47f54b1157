"""End-to-end generation against transformers as the oracle.

* greedy continuations token-identical to HF `generate` (tiny random MHA / GQA / MQA, and SmolLM2)
* paged decode == unpaged full prefill (per-step logits), for awkward prompt lengths and block sizes
* captured attention rows == HF eager `output_attentions` rows
* seeds, stop strings, max_tokens, stream, chat
* bad input and a too-small cache
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import make_checkpoint
from engine import LLM, AttentionCapture, CacheFullError, SamplingParams
from engine.sched.sequence import ScheduledSeq, Sequence

GREEDY_48 = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
PROMPT = list(b"The quick brown fox jumps over")  # used as token ids (all < 256: byte symbols)


# ---- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random tiny LLaMA checkpoints with 4 query heads and 4 / 2 / 1 KV heads."""
    root = tmp_path_factory.mktemp("tiny_gen")
    dirs = {}
    for name, kv in (("mha", 4), ("gqa", 2), ("mqa", 1)):
        make_checkpoint(root / name, num_kv_heads=kv, num_heads=4, seed=kv)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def tiny_hf(tiny_dirs):
    """HF eager models on the tiny checkpoints (eager so `output_attentions` gives the real probabilities)."""
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        for name, d in tiny_dirs.items()
    }


@pytest.fixture(scope="module")
def gqa_llm(tiny_dirs) -> LLM:
    return LLM(tiny_dirs["gqa"], dtype="float32", block_size=4)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """HF greedy continuation that does not stop at eos (and masks nothing)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    new = out[0, len(ids) :].tolist()
    assert len(new) == n, "HF stopped early: eos was not disabled"
    return new


def hf_attentions(model, ids: list[int]) -> list[np.ndarray]:
    """Per layer `[heads, T, T]` eager attention probabilities of one full forward pass."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return [a[0].float().numpy() for a in out.attentions]


def check_rows_against_hf(rows_per_step, ids: list[int], prompt_len: int, hf_att, layers, heads, atol=1e-5):
    """`rows_per_step[i]` is the query row of position prompt_len - 1 + i (the token that produced step i)."""
    assert len(rows_per_step) >= 1
    for i, rows in enumerate(rows_per_step):
        pos = prompt_len - 1 + i
        assert rows.query_position == pos
        assert tuple(rows.heads) == tuple(heads)
        assert sorted(rows.layers) == sorted(layers)
        np.testing.assert_array_equal(rows.key_positions, np.arange(pos + 1))
        for layer in layers:
            got = rows.layers[layer]
            assert got.shape == (len(heads), pos + 1)
            want = hf_att[layer][list(heads), pos, : pos + 1]
            np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=f"step {i} layer {layer}")
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


# ---- greedy == HF generate -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa"])
def test_tiny_greedy_matches_hf_generate(name, tiny_dirs, tiny_hf):
    llm = LLM(tiny_dirs[name], dtype="float32", block_size=8)
    prompts = [PROMPT, list(b"0123456789abcdefX")]
    outs = llm.generate(prompts, GREEDY_48)  # batched: decode rows of different lengths together
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(tiny_hf[name], prompt, 48)
    assert llm.blocks.allocator.num_free == llm.blocks.allocator.num_blocks


SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]
SMOL_NEW = 64


@pytest.fixture(scope="module")
def smol_hf_greedy(smollm2_llm, smollm2_hf) -> list[list[int]]:
    """HF greedy continuations of SMOL_PROMPTS, computed once per module."""
    return [hf_greedy(smollm2_hf, smollm2_llm.tokenizer.encode(p), SMOL_NEW) for p in SMOL_PROMPTS]


@pytest.fixture(scope="module")
def smol_greedy(smollm2_llm):
    """Our greedy continuations of SMOL_PROMPTS (batched), computed once per module."""
    return smollm2_llm.generate(SMOL_PROMPTS, SamplingParams(temperature=0.0, max_tokens=SMOL_NEW, ignore_eos=True))


@pytest.mark.real
def test_smollm2_greedy_matches_hf_generate(smollm2_llm, smol_greedy, smol_hf_greedy):
    for prompt, out, want in zip(SMOL_PROMPTS, smol_greedy, smol_hf_greedy):
        assert out.prompt_token_ids == smollm2_llm.tokenizer.encode(prompt)
        assert len(out.token_ids) == SMOL_NEW and out.finish_reason == "length"
        assert out.token_ids == want, prompt


# ---- paged == unpaged -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 16], ids=lambda b: f"bs{b}")
def paged_llm(request, tiny_dirs) -> LLM:
    return LLM(tiny_dirs["gqa"], dtype="float32", block_size=request.param, num_blocks=512 // request.param)


@pytest.mark.parametrize("prompt_len", [1, 15, 16, 17, 33])
def test_paged_decode_logits_equal_full_prefill(paged_llm, prompt_len):
    llm = paged_llm
    prompt = [(7 * i + 3) % 256 for i in range(prompt_len)]
    steps = 20
    with llm.session(prompt) as s:
        got = [s.step() for _ in range(steps)]
        ids = s.token_ids
    assert ids[:prompt_len] == prompt and len(ids) == prompt_len + steps
    full = llm.logits(ids)
    for i, st in enumerate(got):
        pos = prompt_len - 1 + i  # the query that produced step i
        assert st.position == pos + 1 and st.token_id == ids[pos + 1]
        torch.testing.assert_close(st.logits, full[pos], atol=1e-4, rtol=0)
        assert st.token_id == int(full[pos].argmax())
    # The engine path (scheduler + batched decode) agrees with the session path.
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))[0]
    assert out.token_ids == ids[prompt_len:]
    assert llm.blocks.allocator.num_free == llm.blocks.allocator.num_blocks


# ---- attention capture ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers,heads",
    [(None, None), ((1,), (0, 3)), ((0,), (2,))],
    ids=["all", "layer1-heads03", "layer0-head2"],
)
def test_tiny_gqa_captured_rows_match_hf_eager(gqa_llm, tiny_hf, layers, heads):
    hf = tiny_hf["gqa"]
    prompts = [PROMPT, list(b"Short")]  # batched with different lengths: the masked decode path
    outs = gqa_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), AttentionCapture(layers, heads)
    )
    all_layers, all_heads = (0, 1), (0, 1, 2, 3)
    for prompt, out in zip(prompts, outs):
        ids = prompt + out.token_ids
        assert len(out.attention) == 6
        want = hf_attentions(hf, ids)
        check_rows_against_hf(out.attention, ids, len(prompt), want, layers or all_layers, heads or all_heads)


def test_session_step_and_feed_rows_match_hf_eager(gqa_llm, tiny_hf):
    hf = tiny_hf["gqa"]
    prompt = list(b"abcdefg")
    with gqa_llm.session(prompt, capture=AttentionCapture()) as s:
        rows = [s.step().attention for _ in range(3)]
        fed = s.feed(list(b"xyz"))  # one prefill chunk, three query rows
        rows += [st.attention for st in fed]
        rows.append(s.step().attention)
        ids = s.token_ids
    check_rows_against_hf(rows, ids, len(prompt), hf_attentions(hf, ids), (0, 1), (0, 1, 2, 3))
    # feed as the very first call: the prompt and the forced tokens run in one pass
    with gqa_llm.session(prompt, capture=AttentionCapture(heads=(3,))) as s:
        rows = [st.attention for st in s.feed(list(b"12345"))] + [s.step().attention]
        ids = s.token_ids
    check_rows_against_hf(rows, ids, len(prompt), hf_attentions(hf, ids), (0, 1), (3,))


def test_attention_top_k(gqa_llm):
    out = gqa_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3), AttentionCapture())[0]
    for rows in out.attention:
        ctx = rows.query_position + 1
        for k in (1, 5, ctx + 10):
            top = rows.top_k(k)
            assert sorted(top) == sorted(rows.layers)
            for layer, t in top.items():
                full = rows.layers[layer]
                k_eff = min(k, ctx)
                assert t.probs.shape == t.positions.shape == (full.shape[0], k_eff)
                np.testing.assert_allclose(t.probs.sum(axis=1) + t.leftover, 1.0, atol=1e-5)
                assert np.all(np.diff(t.probs, axis=1) <= 0)  # best first
                np.testing.assert_array_equal(np.take_along_axis(full, t.positions, axis=1), t.probs)
                assert np.all((t.positions >= 0) & (t.positions <= rows.query_position))
                # the k largest: nothing left out is bigger than the smallest kept
                np.testing.assert_allclose(t.probs[:, -1], np.sort(full, axis=1)[:, -k_eff], atol=0)


def test_prefill_matrix_capture_matches_hf(gqa_llm, tiny_hf):
    """AttentionCapture(prefill_matrix=True): the first step carries the prompt's full causal matrix."""
    ids = list(b"prefill matrix!")
    spec = AttentionCapture(layers=(1,), heads=(1, 2), prefill_matrix=True)
    want = hf_attentions(tiny_hf["gqa"], ids)[1][[1, 2]]  # [heads, T, T]
    with gqa_llm.session(ids, capture=spec) as s:
        first, second = s.step().attention, s.step().attention
    assert sorted(first.prefill) == [1] and first.prefill[1].shape == (2, len(ids), len(ids))
    np.testing.assert_allclose(first.prefill[1], want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(first.prefill[1][:, -1], first.layers[1])  # its last row is the step's row
    assert second.prefill is None  # decode steps have no matrix
    # The engine computes the whole prompt for such a request (the session above left its blocks in the
    # prefix cache) and joins the chunks of a chunked prefill into one matrix.
    for llm in (gqa_llm, LLM(gqa_llm.model_dir, block_size=4, max_num_batched_tokens=4)):
        out = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=2), spec)[0]
        assert out.num_cached_prompt_tokens == 0
        np.testing.assert_allclose(out.attention[0].prefill[1], want, atol=1e-5, rtol=0)
        assert out.attention[1].prefill is None
        assert llm.blocks.allocator.num_used == 0


def test_capture_top_k_is_reduced_on_the_device(gqa_llm):
    params = SamplingParams(temperature=0.0, max_tokens=3)
    top_only = gqa_llm.generate(PROMPT, params, AttentionCapture(top_k=3))[0]
    both = gqa_llm.generate(PROMPT, params, AttentionCapture(top_k=3, rows=True))[0]
    for rows, full in zip(top_only.attention, both.attention):
        assert rows.layers == {} and sorted(rows.top) == sorted(full.layers) == [0, 1]  # top-k alone: no full rows
        for layer, t in rows.top.items():
            want = full.top_k(3)[layer]  # the same top-k, computed on the host from the full rows
            np.testing.assert_array_equal(t.probs, want.probs)
            np.testing.assert_array_equal(t.positions, want.positions)
            np.testing.assert_allclose(t.leftover, want.leftover, atol=1e-6)
    plain = gqa_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=1), AttentionCapture())[0]
    assert plain.attention[0].top is None


@pytest.fixture(scope="module")
def smol_hf_attentions(smollm2_hf):
    """HF eager attentions per token sequence, computed once per module."""
    cache = {}

    def get(ids: list[int]):
        if tuple(ids) not in cache:
            cache[tuple(ids)] = hf_attentions(smollm2_hf, ids)
        return cache[tuple(ids)]

    return get


@pytest.mark.real
@pytest.mark.parametrize(
    "layers,heads", [(None, None), ((0, 29), (0, 4, 8)), ((15,), None)], ids=["all", "ends", "mid"]
)
def test_smollm2_captured_rows_match_hf_eager(smollm2_llm, smol_hf_attentions, layers, heads):
    prompt = smollm2_llm.tokenizer.encode("Paris is the capital of")
    out = smollm2_llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), AttentionCapture(layers, heads)
    )[0]
    ids = prompt + out.token_ids
    cfg = smollm2_llm.config
    check_rows_against_hf(
        out.attention,
        ids,
        len(prompt),
        smol_hf_attentions(ids),
        layers or tuple(range(cfg.num_hidden_layers)),
        heads or tuple(range(cfg.num_attention_heads)),
    )


def test_prefix_cache_hit_gives_same_tokens_and_rows(tiny_dirs, tiny_hf):
    # Second run of a prompt reuses its cached full blocks; with 17 tokens and block size 16 only the last
    # prompt token is computed, so the first step runs as a decode row over the reused block.
    llm = LLM(tiny_dirs["gqa"], dtype="float32", block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for prompt in (PROMPT[:17], PROMPT[:5] * 8):
        first = llm.generate(prompt, params, AttentionCapture())[0]
        again = llm.generate(prompt, params, AttentionCapture())[0]
        assert first.num_cached_prompt_tokens == 0
        assert again.num_cached_prompt_tokens == (len(prompt) - 1) // 16 * 16 > 0
        assert again.token_ids == first.token_ids == hf_greedy(tiny_hf["gqa"], prompt, 6)
        ids = prompt + again.token_ids
        want = hf_attentions(tiny_hf["gqa"], ids)
        check_rows_against_hf(again.attention, ids, len(prompt), want, (0, 1), (0, 1, 2, 3))
    # a different prompt sharing the first block reuses just that block
    other = PROMPT[:16] + list(b"different tail")
    out = llm.generate(other, params)[0]
    assert out.num_cached_prompt_tokens == 16
    assert out.token_ids == hf_greedy(tiny_hf["gqa"], other, 6)
    assert llm.engine.stats()["prefix_cache_hits"] >= 3


def test_chunked_prefill_mixed_with_decode_matches_hf(tiny_dirs, tiny_hf):
    # A small token budget splits long prompts into chunks that run in the same forward pass as other
    # requests' decode rows.
    llm = LLM(tiny_dirs["gqa"], dtype="float32", block_size=4, max_num_batched_tokens=7)
    prompts = [list(b"ab"), PROMPT + PROMPT[:9], list(b"a medium prompt")]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), AttentionCapture())
    hf = tiny_hf["gqa"]
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 10)
        ids = prompt + out.token_ids
        check_rows_against_hf(out.attention, ids, len(prompt), hf_attentions(hf, ids), (0, 1), (0, 1, 2, 3))
    assert llm.blocks.allocator.num_free == llm.blocks.allocator.num_blocks


# ---- sampling seeds ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_batch_independent(gqa_llm):
    def params(seed, **kw):
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=24, ignore_eos=True, **kw)

    a1 = gqa_llm.generate(PROMPT, params(1234))[0]
    a2 = gqa_llm.generate(PROMPT, params(1234))[0]
    b = gqa_llm.generate(PROMPT, params(4321))[0]
    assert a1.token_ids == a2.token_ids and a1.text == a2.text
    assert b.token_ids != a1.token_ids
    # a separately built engine (other block size, cold cache) samples the same text from the same seed
    other_engine = LLM(gqa_llm.model_dir, dtype="float32", block_size=16)
    a3 = other_engine.generate(PROMPT, params(1234))[0]
    assert a3.token_ids == a1.token_ids and a3.text == a1.text
    greedy = gqa_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert a1.token_ids != greedy.token_ids  # really sampled
    batch = gqa_llm.generate(
        [list(b"other prompt"), PROMPT, list(b"x"), PROMPT],
        [params(None), params(1234), params(99, top_k=5), SamplingParams(temperature=0.0, max_tokens=7)],
    )
    assert batch[1].token_ids == a1.token_ids and batch[1].text == a1.text
    assert batch[3].token_ids == greedy.token_ids[:7]


# ---- stop strings, lengths, stream, chat ------------------------------------------------------------


def find_cross_token_stop(tokenizer, ids: list[int], text: str) -> tuple[str, int]:
    """A 4-character stop string made of the last 2 characters of one token's text and the first 2 of the
    next's, occurring first at that boundary; returns (stop, index in text)."""
    def dec(part):
        return tokenizer.decode(part, skip_special_tokens=True)

    for k in range(3, len(ids) - 2):
        head = dec(ids[:k])
        if not text.startswith(head) or len(dec(ids[k - 1 : k])) < 2 or len(dec(ids[k : k + 1])) < 2:
            continue
        boundary = len(head)
        stop = text[boundary - 2 : boundary + 2]
        if len(stop) == 4 and text.find(stop) == boundary - 2:
            return stop, boundary - 2
    raise AssertionError("no suitable stop string in the continuation")


@pytest.mark.real
def test_stop_string_spanning_tokens_is_trimmed(smollm2_llm, smol_greedy):
    llm = smollm2_llm
    for prompt, full in zip(SMOL_PROMPTS[:1], smol_greedy[:1]):
        text = llm.tokenizer.decode(full.token_ids, skip_special_tokens=True)
        assert full.text == text
        stop, idx = find_cross_token_stop(llm.tokenizer, full.token_ids, text)
        params = SamplingParams(temperature=0.0, max_tokens=SMOL_NEW, ignore_eos=True, stop=["never-appears", stop])
        out = llm.generate(prompt, params)[0]
        assert out.finish_reason == "stop"
        assert out.stop_reason == stop
        assert out.text == text[:idx]
        assert stop not in out.text
        # generation ended at the token that completed the stop string, which began in an earlier token
        assert out.token_ids == full.token_ids[: len(out.token_ids)]
        upto_last = len(llm.tokenizer.decode(out.token_ids, skip_special_tokens=True))
        before_last = len(llm.tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True))
        assert before_last < idx + len(stop) <= upto_last
        assert idx < before_last
        # streaming holds back the partial match and emits the same text
        assert "".join(llm.stream(prompt, params)) == out.text


def test_max_tokens_finishes_with_length(gqa_llm):
    out = gqa_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    # the context length also ends a request with "length"
    llm = LLM(gqa_llm.model_dir, block_size=4, max_model_len=len(PROMPT) + 3)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_stream_deltas_concatenate_to_generate_text_bytes(gqa_llm):
    # Random byte tokens: many are partial UTF-8 sequences the detokenizer must hold back and release.
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = gqa_llm.generate(PROMPT, params)[0]
    deltas = list(gqa_llm.stream(PROMPT, params))
    assert "".join(deltas) == want.text
    assert len(deltas) > 1
    assert gqa_llm.blocks.allocator.num_free == gqa_llm.blocks.allocator.num_blocks


def test_stream_closed_early_frees_blocks(gqa_llm):
    it = gqa_llm.stream(PROMPT, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    next(it)
    it.close()
    assert not gqa_llm.engine.has_unfinished()
    assert gqa_llm.blocks.allocator.num_free == gqa_llm.blocks.allocator.num_blocks


@pytest.mark.real
def test_chat(smollm2_llm, smollm2_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outs = smollm2_llm.chat(messages, params)
    assert len(outs) == 1
    out = outs[0]
    hf_ids = AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    if not isinstance(hf_ids, list):
        hf_ids = hf_ids["input_ids"]
    assert out.prompt_token_ids == list(hf_ids)
    assert out.finished and out.text.strip()
    assert out.text == smollm2_llm.generate(list(hf_ids), params)[0].text


def test_chat_tiny(gqa_llm, tiny_dirs):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hi"}]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    out = gqa_llm.chat(messages, params)[0]
    hf_ids = AutoTokenizer.from_pretrained(tiny_dirs["gqa"]).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    if not isinstance(hf_ids, list):
        hf_ids = hf_ids["input_ids"]
    assert out.prompt_token_ids == list(hf_ids)
    assert out.prompt_token_ids.count(257) == 2  # <|im_start|> is one special token, twice
    assert out.token_ids == gqa_llm.generate(list(hf_ids), params)[0].token_ids
    two = gqa_llm.chat([messages, [{"role": "user", "content": "a longer question?"}]], params)
    assert len(two) == 2 and two[0].token_ids == out.token_ids and two[1].prompt_token_ids != out.prompt_token_ids


# ---- bad input --------------------------------------------------------------------------------------


def test_empty_prompt_raises(gqa_llm):
    with pytest.raises(ValueError, match="empty"):
        gqa_llm.generate("")
    with pytest.raises(ValueError, match="empty"):
        gqa_llm.logits([])
    with pytest.raises(ValueError, match="empty"):
        gqa_llm.session("")
    with pytest.raises(ValueError, match="empty"):
        list(gqa_llm.stream(""))
    assert not gqa_llm.engine.has_unfinished()


def test_prompt_plus_max_tokens_beyond_context_raises(gqa_llm):
    n = gqa_llm.max_model_len
    with pytest.raises(ValueError, match="context length"):
        gqa_llm.generate([65] * (n - 10), SamplingParams(max_tokens=11))
    with pytest.raises(ValueError, match="context length"):
        gqa_llm.generate([65] * (n + 1), SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="context length"):
        gqa_llm.logits([65] * (n + 1))
    # exactly at the limit is fine to queue (not run here)
    from engine.api.validation import check_request

    assert check_request([65] * (n - 10), SamplingParams(max_tokens=10), gqa_llm.engine.limits) == 10
    assert not gqa_llm.engine.has_unfinished()


def test_out_of_vocab_prompt_raises(gqa_llm):
    with pytest.raises(ValueError, match="vocab"):
        gqa_llm.generate([1, 2, gqa_llm.config.vocab_size])
    with pytest.raises(ValueError, match="vocab"):
        gqa_llm.generate([-1])


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", 1000),
        ("seed", "abc"),
        ("stop", [""]),
        ("stop_token_ids", [-3]),
    ],
)
def test_invalid_sampling_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_generate_params_count_mismatch_raises(gqa_llm):
    with pytest.raises(ValueError):
        gqa_llm.generate([PROMPT, PROMPT], [SamplingParams()])
    assert not gqa_llm.engine.has_unfinished()


def test_too_small_cache_raises_and_recovers(tiny_dirs, gqa_llm):
    llm = LLM(tiny_dirs["gqa"], dtype="float32", block_size=16, num_blocks=2)
    alloc = llm.blocks.allocator
    with pytest.raises(CacheFullError):
        llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=40))  # 70 tokens > 32 slots
    assert alloc.num_free == alloc.num_blocks == 2
    assert not llm.engine.has_unfinished()
    # A session that outgrows the pool raises, and closing it returns everything.
    s = llm.session(PROMPT)
    with pytest.raises(CacheFullError):
        for _ in range(40):
            s.step()
    s.close()
    assert alloc.num_free == 2
    small = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    out = llm.generate(list(b"tiny"), small)[0]
    assert out.token_ids == gqa_llm.generate(list(b"tiny"), small)[0].token_ids
    assert alloc.num_free == 2


def test_failed_request_in_a_batch_leaves_nothing_queued(tiny_dirs):
    # Regression test: LLM.generate used to queue the requests one by one *before* its try/finally, so when a
    # later prompt of the batch was rejected the earlier ones stayed queued in the engine (fixed in 4d189f8).
    llm = LLM(tiny_dirs["gqa"], dtype="float32", block_size=16, num_blocks=2)
    ok = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(CacheFullError):
        llm.generate([list(b"ok"), PROMPT], [ok, SamplingParams(temperature=0.0, max_tokens=40)])
    assert not llm.engine.has_unfinished(), "the accepted first request was left queued"
    with pytest.raises(ValueError):
        llm.generate([list(b"ok"), []], ok)
    assert not llm.engine.has_unfinished(), "the accepted first request was left queued"
    assert llm.blocks.allocator.num_free == 2


def run_bounded(llm: LLM, prompts, params, max_steps: int):
    """Like `llm.generate`, but gives up (aborting everything) after `max_steps` engine steps, so a
    scheduler that stops making progress fails the test instead of hanging it."""
    ids = [llm.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    final = {}
    try:
        for _ in range(max_steps):
            for out in llm.engine.step():
                if out.finished:
                    final[out.request_id] = out
            if len(final) == len(ids):
                break
    finally:
        for rid in ids:
            llm.engine.abort(rid)
    assert len(final) == len(ids), f"stuck: {len(final)} of {len(ids)} requests finished in {max_steps} steps"
    return [final[rid] for rid in ids]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_tight_cache_preempts_and_still_matches(tiny_dirs, gqa_llm, prefix_caching):
    # Each request alone needs the whole pool, so running them together forces preemption + recompute.
    # Regression guard (prefix-cache variant): a waiting sequence used to keep the prefix-cache blocks it
    # had matched when the rest of its prompt did not fit; once every sequence waited like that nothing
    # could run again and `generate` hung. The scheduler now releases them before it waits.
    llm = LLM(tiny_dirs["gqa"], dtype="float32", block_size=4, num_blocks=4, enable_prefix_caching=prefix_caching)
    prompts = [list(b"aaaaa"), list(b"bbbbbb"), list(b"cc")]
    params = [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    ]
    outs = run_bounded(llm, prompts, params, max_steps=200)
    want = [gqa_llm.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert llm.engine.stats()["preemptions"] > 0
    assert llm.blocks.allocator.num_free == 4
