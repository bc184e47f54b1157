"""Speculative decoding with n-gram drafts (engine/sampling/speculative.py): the drafts, the back-off, and the rule that
matters — a greedy or seeded request gives bitwise the same tokens and logprobs with and without speculation,
alone or batched with others, chunked, preempted or on prefix-cache hits, with penalties, min_tokens, stop
strings and max_tokens, and every KV block comes back."""

from __future__ import annotations

import json
import random

import pytest

from checkpoints import make_checkpoint
from engine import LLM, AttentionCapture, SamplingParams
from engine.sampling.speculative import BACKOFF_PAUSE, DraftState, NgramIndex, SpeculativeConfig
from engine.text.structured import StructuredOutput

BLOCK = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("speculative") / "gqa"
    make_checkpoint(path, num_kv_heads=2, num_heads=4, hidden=64, layers=2, seed=3)
    return path


# ---- drafts --------------------------------------------------------------------------------------------------


def test_ngram_index_drafts_what_followed_the_latest_longest_match():
    index = NgramIndex(n_min=2, n_max=3)
    #         0  1  2  3  4  5  6  7  8  9  10 11
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    # The suffix (6, 7) ended at 2 and at 7; the latest is taken: what followed position 7.
    assert index.propose(tokens, 3) == [2, 3, 6]
    # A longer suffix wins over a later shorter one: (5, 6, 7) ended at 2 only.
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 5, 6, 7]
    assert NgramIndex(2, 3).propose(tokens, 2) == [8, 9]
    assert NgramIndex(2, 3).propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert NgramIndex(2, 3).propose([4, 4], 4) == []  # the suffix itself is not an earlier occurrence
    assert NgramIndex(2, 3).propose([4, 4, 4], 4) == [4]  # (4, 4) ended at 1: one token followed it


def test_ngram_index_grows_with_the_sequence():
    index = NgramIndex(2, 2)
    tokens = [1, 2, 3]
    assert index.propose(tokens, 4) == []
    tokens += [1, 2]
    assert index.propose(tokens, 4) == [3, 1, 2]  # stops at the end of the sequence
    assert index.num_indexed == len(tokens) - 1


def test_draft_length_backs_off_and_recovers():
    state = DraftState.start(SpeculativeConfig(num_speculative_tokens=8, prompt_lookup_min=2))
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    assert state.propose(tokens, 100) == [3, 4, 5, 6, 7, 8, 9, 1]
    assert state.propose(tokens, 3) == [3, 4, 5]  # the caller's limit (budget, blocks, max_tokens)
    for expected in (4, 2, 1, 0):
        state.record(8, 0)
        assert state.num_tokens == expected
    assert state.pause == BACKOFF_PAUSE
    for _ in range(BACKOFF_PAUSE):
        assert state.propose(tokens, 100) == []
    assert state.propose(tokens, 100) == [3]  # retried with one token
    state.record(1, 1)
    assert state.num_tokens == 2
    state.record(2, 1)  # partly accepted: unchanged
    assert state.num_tokens == 2
    assert (state.num_drafted, state.num_accepted) == (35, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="eagle"), "speculative method"),
    (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(num_speculative_tokens=True), "num_speculative_tokens"),
    (dict(prompt_lookup_min=4, prompt_lookup_max=2), "prompt_lookup_min"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)


def test_num_speculative_tokens_needs_a_method(tiny):
    with pytest.raises(ValueError, match="needs speculative"):
        LLM(tiny, num_speculative_tokens=4)
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="yes")


# ---- same tokens with and without speculation ---------------------------------------------------------------


def repetitive(n: int, seed: int) -> list[int]:
    """A prompt that repeats a phrase, as a passage the output copies would: drafts find matches."""
    rng = random.Random(seed)
    phrase = [rng.randrange(3, 250) for _ in range(rng.randint(4, 12))]
    ids = []
    while len(ids) < n:
        ids += phrase if rng.random() < 0.7 else [rng.randrange(3, 250)]
    return ids[:n]


LOOP = {5: 4.0, 6: 4.0, 7: 4.0}


def requests() -> list[tuple[list[int], SamplingParams]]:
    return [
        (repetitive(20, 1), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3)),
        (repetitive(70, 2), SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True, logprobs=2)),
        (repetitive(150, 3), SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True)),
        (repetitive(40, 4), SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=3, max_tokens=30,
                                           ignore_eos=True, repetition_penalty=1.2, presence_penalty=0.3)),
        (repetitive(33, 5), SamplingParams(temperature=0.0, max_tokens=30, min_tokens=12, frequency_penalty=0.5)),
        (repetitive(90, 6), SamplingParams(temperature=0.0, max_tokens=50, logprobs=0)),
        # A random model rarely repeats itself; a bias on three tokens makes it loop, so drafts are accepted.
        (repetitive(40, 9), SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logit_bias=LOOP)),
        (repetitive(50, 7), SamplingParams(temperature=0.7, seed=9, max_tokens=60, ignore_eos=True, logprobs=1,
                                           logit_bias=LOOP)),
    ]


def signature(out) -> tuple:
    return (tuple(out.token_ids), out.text, out.finish_reason,
            tuple((lp.token_id, lp.logprob, tuple(lp.top)) for lp in out.logprobs or ()))


def plain(model, dtype, quantization, reqs) -> list[tuple]:
    llm = LLM(model, dtype=dtype, quantization=quantization, block_size=BLOCK)
    return [signature(llm.generate([p], [s])[0]) for p, s in reqs]


@pytest.mark.parametrize("mode", [("float32", None), ("bfloat16", "auto")], ids=["float32", "bfloat16-auto"])
def test_same_tokens_alone_and_batched(tiny, mode):
    reqs = requests()
    expected = plain(tiny, *mode, reqs)
    spec = LLM(tiny, dtype=mode[0], quantization=mode[1], block_size=BLOCK, speculative="ngram",
               num_speculative_tokens=6)
    assert [signature(spec.generate([p], [s])[0]) for p, s in reqs] == expected  # alone
    outs = spec.generate([p for p, _ in reqs], [s for _, s in reqs])  # all together
    assert [signature(o) for o in outs] == expected
    assert sum(o.num_accepted_tokens for o in outs) > 0, "the test must exercise accepted drafts"
    assert any(o.num_draft_tokens > o.num_accepted_tokens for o in outs), "and rejected ones"
    stats = spec.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["kv_blocks_used"] == 0


def test_same_tokens_under_a_small_budget_preemption_and_prefix_hits(tiny):
    reqs = requests()
    expected = plain(tiny, "float32", None, reqs)
    # 24 blocks of 16 tokens for six sequences of up to 200 tokens: sequences are preempted and recomputed.
    spec = LLM(tiny, block_size=BLOCK, num_blocks=24, max_num_batched_tokens=40, speculative="ngram",
               num_speculative_tokens=8)
    outs = spec.generate([p for p, _ in reqs], [s for _, s in reqs])
    assert [signature(o) for o in outs] == expected
    assert spec.engine.stats()["preemptions"] > 0
    again = spec.generate([p for p, _ in reqs[-2:]], [s for _, s in reqs[-2:]])  # prompts in the prefix cache
    assert [signature(o) for o in again] == expected[-2:]
    assert sum(o.num_cached_prompt_tokens for o in again) > 0
    assert spec.engine.stats()["kv_blocks_used"] == 0


def test_stop_strings_and_max_tokens_end_where_plain_decoding_ends(tiny):
    base = LLM(tiny, block_size=BLOCK)
    spec = LLM(tiny, block_size=BLOCK, speculative="ngram", num_speculative_tokens=8)
    ids = repetitive(60, 8)
    text = base.generate([ids], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for params in (SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]),
                   SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)):
        want, got = base.generate([ids], params)[0], spec.generate([ids], params)[0]
        assert signature(got) == signature(want)
        assert got.stop_reason == want.stop_reason
    assert spec.engine.stats()["kv_blocks_used"] == 0


def test_each_token_has_its_own_output_and_the_cache_is_rolled_back(tiny):
    spec = LLM(tiny, block_size=4, speculative="ngram", num_speculative_tokens=8)
    engine = spec.engine
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logit_bias={5: 3.0, 6: 3.0, 7: 3.0})
    rid = engine.add_request(repetitive(40, 9), params)
    seen, steps = [], 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        for out in outs:
            assert len(out.new_token_ids) == 1
            seen += out.new_token_ids
            assert out.token_ids == seen  # each output is the request as of its token
        for seq in engine.scheduler.running:  # no block held past what the next token needs
            assert len(seq.block_table.blocks) <= engine.blocks.blocks_needed(seq.num_tokens)
            assert seq.num_computed == seq.num_tokens - 1
    last = outs[-1]
    assert len(seen) == 60 and last.request_id == rid and last.finish_reason == "length"
    assert 0 < last.num_accepted_tokens < last.num_draft_tokens, "drafts accepted and rejected"
    assert steps == 60 - last.num_accepted_tokens  # each accepted draft token saved a step
    assert seen == LLM(tiny, block_size=4).generate([repetitive(40, 9)], params)[0].token_ids
    assert engine.stats()["kv_blocks_used"] == 0


def test_what_is_not_speculated(tiny):
    spec = LLM(tiny, block_size=BLOCK, speculative="ngram")
    ids = repetitive(60, 10)
    greedy = dict(temperature=0.0, max_tokens=20, ignore_eos=True, logit_bias=LOOP)
    assert spec.generate([ids], SamplingParams(**greedy))[0].num_draft_tokens > 0
    assert spec.generate([ids], SamplingParams(**greedy, speculative=False))[0].num_draft_tokens == 0
    assert spec.generate([ids], SamplingParams(**greedy, kv_policy="sink_window:4:64"))[0].num_draft_tokens == 0
    captured = spec.generate([ids], SamplingParams(**greedy), capture=AttentionCapture(top_k=2))[0]
    assert captured.num_draft_tokens == 0 and len(captured.attention) == 20
    json_out = spec.generate([ids], SamplingParams(temperature=0.0, max_tokens=20,
                                                    structured_output=StructuredOutput(json_object=True)))[0]
    assert json_out.num_draft_tokens == 0


# ---- the real model through the server ------------------------------------------------------------------------

PASSAGE = ("The paged KV cache stores keys and values in fixed-size blocks. Each sequence holds a block table "
           "that maps its positions to blocks, so memory is allocated as the sequence grows and returned when it "
           "finishes. Blocks whose tokens match another request's prompt are shared through the prefix cache.")


def test_server_streams_the_same_text_and_counts_drafts(smollm2_dir, smollm2_llm):
    import httpx
    from live_server import LiveServer

    from server import ServerSettings, create_app

    messages = [{"role": "user", "content": f"Repeat this passage exactly:\n\n{PASSAGE}"}]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    want = smollm2_llm.generate(smollm2_llm.chat_prompt(messages), params)[0]
    spec = LLM(smollm2_dir, dtype="float32", kv_cache_memory=32 << 20, speculative="ngram", num_speculative_tokens=6)
    body = {"messages": messages, "temperature": 0, "max_tokens": 64, "stream": True}
    with LiveServer(create_app(spec, ServerSettings())) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        for opt_out in (False, True):
            text = ""
            with http.stream("POST", "/v1/chat/completions", json=body | {"speculative": not opt_out}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        text += chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else ""
            assert text == want.text
            metrics = http.get("/metrics").text
            accepted = metric(metrics, "kvmini_spec_decode_num_accepted_tokens_total")
            drafted = metric(metrics, "kvmini_spec_decode_num_draft_tokens_total")
            if not opt_out:
                assert 0 < accepted <= drafted, "copying a passage: drafts are accepted"
                first = drafted
            else:
                assert drafted == first, "speculative: false drafts nothing"
        bad = http.post("/v1/chat/completions", json=body | {"speculative": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    assert spec.engine.stats()["kv_blocks_used"] == 0


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
