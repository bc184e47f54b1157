"""Prompt logprobs (`SamplingParams.prompt_logprobs`) and /v1/completions' `echo`, lists of prompts, and
lm-eval's loglikelihood requests against the live server, all checked against the library's own logits."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams
from live_server import LiveServer
from server import create_app


def reference_logprobs(llm: LLM, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from one full prefill (`LLM.logits`)."""
    lp = torch.log_softmax(llm.logits(ids), dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


# ---- the engine ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLM:
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, num_kv_heads=2, layers=2, hidden=64)
    # A 7-token step budget: a 40-token prompt runs in 6 chunks, each scoring its own positions.
    return LLM(path, block_size=4, num_blocks=64, max_num_batched_tokens=7)


def test_prompt_logprobs_over_chunks_equal_a_full_prefill(tiny):
    ids = list(range(3, 43))
    [out] = tiny.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    plps = out.prompt_logprobs
    assert len(plps) == len(ids) and plps[0] is None
    assert [p.token_id for p in plps[1:]] == ids[1:]
    assert [p.logprob for p in plps[1:]] == pytest.approx(reference_logprobs(tiny, ids), abs=1e-4)
    lp = torch.log_softmax(tiny.logits(ids), dim=-1)
    top_values, top_ids = lp[4].topk(3)
    assert [t for t, _ in plps[5].top] == top_ids.tolist()
    assert [v for _, v in plps[5].top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_prompt_logprobs_skip_the_prefix_cache_and_batch_with_others(tiny):
    ids = list(range(50, 90))
    warm = tiny.generate([ids], SamplingParams(max_tokens=1, temperature=0))[0]  # fills the prefix cache
    plain, scored = tiny.generate([ids, ids], [SamplingParams(max_tokens=3, temperature=0),
                                               SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0)])
    assert plain.num_cached_prompt_tokens > 0  # the plain request reuses the cache ...
    assert scored.num_cached_prompt_tokens == 0  # ... the scored one computes every prompt token
    assert [p.logprob for p in scored.prompt_logprobs[1:]] == pytest.approx(reference_logprobs(tiny, ids), abs=1e-4)
    assert all(p.top == [] for p in scored.prompt_logprobs[1:])
    assert plain.token_ids == scored.token_ids and warm.token_ids == plain.token_ids[:1]
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_is_checked():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


# ---- /v1/completions ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(smollm2_dir, dtype="float32", kv_cache_memory=64 << 20)


@pytest.fixture(scope="module")
def live(llm):
    with LiveServer(create_app(llm)) as server:
        yield server


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


PROMPTS = ["The capital of France is", "One, two, three, four,"]


def test_echo_returns_the_prompt_with_its_logprobs(http, llm, live):
    r = http.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 2, "n": 2, "echo": True,
                                           "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt i, choice j -> index i * n + j
    for i, prompt in enumerate(PROMPTS):
        ids = llm.tokenizer.encode(prompt)
        # On the engine thread: the server steps `llm`, and two threads must never step one engine.
        [alone] = live.on_engine_thread(lambda: llm.generate([ids], SamplingParams(max_tokens=2, temperature=0)))
        for choice in body["choices"][2 * i : 2 * i + 2]:
            assert choice["text"] == prompt + alone.text
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + 2
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(reference_logprobs(llm, ids), abs=1e-4)
            assert "".join(lp["tokens"]) == choice["text"]
            # text_offset: where each token starts in the returned text, prompt and completion alike
            assert [choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"])] == \
                [True] * len(ids + alone.token_ids)
    prompt_tokens = sum(len(llm.tokenizer.encode(p)) for p in PROMPTS)
    assert body["usage"]["prompt_tokens"] == prompt_tokens  # each prompt once, not once per choice
    assert body["usage"]["completion_tokens"] == 8


def test_echo_with_max_tokens_0_returns_the_prompt_alone(http, llm):
    ids = llm.tokenizer.encode(PROMPTS[0])
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["text"] == PROMPTS[0] and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(reference_logprobs(llm, ids), abs=1e-4)
    assert r.json()["usage"]["completion_tokens"] == 0
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_echo_streams_the_prompt_first(http):
    body = {"prompt": PROMPTS, "max_tokens": 3, "echo": True, "logprobs": 0, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()
    events = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    for choice in whole["choices"]:
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == choice["index"]]
        assert mine[0]["text"].startswith(PROMPTS[choice["index"]])
        assert "".join(c["text"] for c in mine) == choice["text"]
        joined = {k: sum((c["logprobs"][k] for c in mine), []) for k in choice["logprobs"]}
        assert joined == choice["logprobs"]


def test_a_bad_prompt_in_a_list_is_named(http):
    r = http.post("/v1/completions", json={"prompt": [[1, 2], [3, 10**9]], "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt[1][1]"  # the second prompt's second token


# ---- lm-eval --------------------------------------------------------------------------------------------


def test_lm_eval_loglikelihood_equals_the_library(live, llm, smollm2_dir):
    """lm-eval's own client (`local-completions`) builds its echo requests, sends them to the live server
    and parses the answers: its log-likelihoods and greedy flags are the library's."""
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: make setup installs it")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{live.url}/v1/completions", model="smollm2-135m-instruct",
                             tokenizer=str(smollm2_dir), tokenizer_backend="huggingface", batch_size=2,
                             max_retries=1, num_concurrent=1)
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " a banana"),
             ("One, two, three,", " four")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ctx, cont = llm.tokenizer.encode(context), llm.tokenizer.encode(context + continuation)[len(
            llm.tokenizer.encode(context)):]
        lp = torch.log_softmax(llm.logits(ctx + cont), dim=-1)
        want = [lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)]
        assert logprob == pytest.approx(sum(want), abs=1e-3)
        assert greedy == all(lp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
    assert results[0][0] > results[1][0]  # Paris is likelier than a banana
