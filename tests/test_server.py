"""The HTTP server, live on loopback: OpenAI client compatibility, concurrency, disconnects, attention
streaming, error mapping, metrics. One SmolLM2 `LLM` for the module, served by uvicorn in a thread."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from engine import LLM, AttentionCapture, SamplingParams, char_spans
from live_server import LiveServer
from server import ServerSettings, create_app

pytestmark = [pytest.mark.real, pytest.mark.slow]

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(smollm2_dir, dtype="float32", kv_cache_memory=64 << 20)  # 91 blocks of 16 tokens


@pytest.fixture(scope="module")
def live(llm):
    with LiveServer(create_app(llm, ServerSettings(api_key=KEY))) as server:
        yield server


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture()
def oai(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def sse_events(lines) -> list:
    """Parsed `data:` payloads of an SSE stream ("[DONE]" kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(cond, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_error(r: httpx.Response, status: int, param: str | None = "__any__", code: str | None = "__any__"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    if code != "__any__":
        assert err["code"] == code, err
    return err


# ---- OpenAI client ------------------------------------------------------------------------------------


def test_completions_match_library_stream_and_usage(live, oai, llm):
    ids = llm.tokenizer.encode(PROMPT)
    ref = live.on_engine_thread(lambda: llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10))[0])

    r = oai.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "smollm2-135m-instruct"
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)

    chunks = list(oai.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(ids)

    # token-id prompt (and a list of one) give the same text
    r2 = oai.completions.create(model="smollm2-135m-instruct", prompt=[ids], max_tokens=10, temperature=0)
    assert r2.choices[0].text == ref.text


def test_completions_logprobs_and_n(oai):
    r = oai.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                               n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices agree
    assert r.usage.completion_tokens == 12
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert abs(max(top.values()) - chosen) < 1e-5  # greedy: the chosen token is the best one

    # seeded sampling: choice i runs with seed + i
    kw = dict(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=8, temperature=1.0)
    two = oai.completions.create(n=2, seed=1234, **kw)
    first = oai.completions.create(seed=1234, **kw)
    second = oai.completions.create(seed=1235, **kw)
    assert two.choices[0].text == first.choices[0].text
    assert two.choices[1].text == second.choices[0].text
    assert two.choices[0].text != two.choices[1].text


def test_chat_completions_stream_equals_non_stream(oai, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_len = len(llm.chat_prompt(messages))
    r = oai.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=12, temperature=0,
                                    logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and bytes(c.bytes).decode() == c.token for c in content)

    stream = oai.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=12,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # n=2 streamed: chunks interleave, each choice ends once
    chunks = list(oai.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=5,
                                              temperature=0, n=2, stream=True))
    texts = {0: "", 1: ""}
    ends = []
    for c in chunks:
        ch = c.choices[0]
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            ends.append(ch.index)
    assert sorted(ends) == [0, 1] and texts[0] == texts[1] != ""


# ---- concurrency and disconnects ----------------------------------------------------------------------


def test_sixteen_concurrent_streams(live, http):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" if i % 2 else f"List {i} colours:" for i in range(16)]
    body = {"max_tokens": 8, "temperature": 0}
    expected = [http.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]

    def stream(prompt: str) -> str:
        with httpx.Client(base_url=live.url, headers=AUTH, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json={**body, "prompt": prompt, "stream": True}) as resp:
                assert resp.status_code == 200
                events = sse_events(resp.iter_lines())
        assert events[-1] == "[DONE]"
        return "".join(e["choices"][0]["text"] for e in events[:-1])

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(stream, prompts))
    assert got == expected
    assert live.state.engine_loop.stats["kv_blocks_used"] == 0


def test_disconnect_mid_stream_aborts_and_frees_blocks(live, http):
    def aborted() -> float:
        return metric(http.get("/metrics").text, 'kvmini_requests_total{status="aborted"}')

    before = aborted()
    body = {"prompt": "Write a long story about a dragon.", "max_tokens": 300, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        break
            assert metric(http.get("/metrics").text, "kvmini_kv_blocks_used") > 0
    # the client is gone: the request is aborted and its blocks return within a short wait
    wait_for(lambda: metric(http.get("/metrics").text, "kvmini_kv_blocks_used") == 0, 10, "blocks to be freed")
    assert aborted() == before + 1
    assert live.on_engine_thread(lambda: live.state.llm.blocks.allocator.num_used) == 0

    # a non-streaming request whose client times out is aborted as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", headers=AUTH, timeout=httpx.Timeout(60, read=0.5),
                   json={**body, "stream": False})
    wait_for(lambda: aborted() == before + 2, 10, "non-streaming request to be aborted")
    wait_for(lambda: metric(http.get("/metrics").text, "kvmini_kv_blocks_used") == 0, 10, "blocks to be freed")


# ---- /generate with attention ---------------------------------------------------------------------------


def test_generate_full_attention_rows_match_library(live, http, llm):
    layers, heads, n = (0, 29), (0, 4, 8), 4
    prompt = "The quick brown fox"
    ids = llm.tokenizer.encode(prompt)
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0,
            "attention": {"layers": list(layers), "heads": list(heads)}}
    with http.stream("POST", "/generate", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    tokens, final = events[:-1], events[-1]
    assert final["done"] is True and final["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n,
                                                        "total_tokens": len(ids) + n,
                                                        "prompt_tokens_details": {"cached_tokens": 0}}

    capture = AttentionCapture(layers=layers, heads=heads)
    ref = live.on_engine_thread(lambda: llm.generate(ids, SamplingParams(temperature=0, max_tokens=n),
                                                     capture=capture)[0])
    assert [e["token_id"] for e in tokens] == ref.token_ids == final["token_ids"]
    assert "".join(e["text"] for e in tokens) == final["text"] == ref.text
    all_ids = ids + ref.token_ids
    for i, (ev, rows) in enumerate(zip(tokens, ref.attention, strict=True)):
        att = ev["attention"]
        q = att["query_position"]
        assert q == len(ids) - 1 + i == rows.query_position and ev["position"] == q + 1
        assert att["heads"] == list(heads)
        assert att["key_positions"] == list(range(q + 1))
        assert att["key_token_ids"] == all_ids[: q + 1]
        assert set(att["layers"]) == {str(layer) for layer in layers}
        for layer in layers:
            got = np.array(att["layers"][str(layer)])
            assert got.shape == (len(heads), q + 1)
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-3)
            np.testing.assert_allclose(got, rows.layers[layer], atol=1e-4)
        assert ev["logprob"] <= 0 and "top_logprobs" not in ev


def test_generate_top_k_ndjson_and_non_stream(live, http, llm):
    k, n = 3, 3
    messages = [{"role": "user", "content": "Hi"}]
    ids = llm.chat_prompt(messages)
    body = {"messages": messages, "max_tokens": n, "temperature": 0, "format": "ndjson", "logprobs": 2,
            "attention": {"layers": [3], "top_k": k}}
    with http.stream("POST", "/generate", json=body) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in resp.iter_lines() if line]
    tokens, final = events[:-1], events[-1]
    assert final["done"] and len(tokens) == n

    capture = AttentionCapture(layers=(3,))
    ref = live.on_engine_thread(lambda: llm.generate(ids, SamplingParams(temperature=0, max_tokens=n),
                                                     capture=capture)[0])
    all_ids = ids + ref.token_ids
    for ev, rows in zip(tokens, ref.attention, strict=True):
        assert len(ev["top_logprobs"]) == 2
        entry = ev["attention"]["layers"]["3"]
        probs, pos = np.array(entry["probs"]), np.array(entry["positions"])
        assert probs.shape == pos.shape == (llm.config.num_attention_heads, k)
        np.testing.assert_allclose(probs.sum(axis=1) + np.array(entry["leftover"]), 1.0, atol=1e-3)
        full = rows.layers[3]
        np.testing.assert_allclose(probs, np.take_along_axis(full, pos, axis=1), atol=1e-4)
        np.testing.assert_allclose(probs, -np.sort(-full, axis=1)[:, :k], atol=1e-4)
        assert entry["key_token_ids"] == [[all_ids[p] for p in head] for head in pos.tolist()]

    r = http.post("/generate", json={**body, "stream": False}).json()
    assert [t["token_id"] for t in r["tokens"]] == ref.token_ids and r["text"] == ref.text and r["done"]


def test_usage_reports_cached_prompt_tokens(live, http, llm):
    """usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache already held (whole blocks)."""
    prompt = "A prompt no other test sends, long enough for a few KV blocks: " + "cached tokens " * 20
    n_prompt = len(llm.tokenizer.encode(prompt))
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = http.post("/v1/completions", json=body).json()["usage"]
    again = http.post("/v1/completions", json=body).json()["usage"]
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2, "temperature": 0}
    chat_first = http.post("/v1/chat/completions", json=chat).json()["usage"]
    chat_again = http.post("/v1/chat/completions", json=chat).json()["usage"]
    block = llm.blocks.block_size
    assert first["prompt_tokens"] == n_prompt and first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["prompt_tokens_details"]["cached_tokens"] == (n_prompt - 1) // block * block > 0
    assert chat_first["prompt_tokens_details"]["cached_tokens"] < chat_again["prompt_tokens_details"]["cached_tokens"]


def test_logit_bias_forces_and_bans_tokens(http, llm):
    token = llm.tokenizer.encode(" banana")[0]
    body = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 0}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    forced = http.post("/v1/completions", json={**body, "logit_bias": {str(token): 100}}).json()["choices"][0]
    assert forced["logprobs"]["tokens"] == [llm.tokenizer.decode([token])] * 3
    first = llm.tokenizer.encode(plain["logprobs"]["tokens"][0])[0]
    banned = http.post("/v1/completions", json={**body, "logit_bias": {str(first): -100}}).json()["choices"][0]
    assert banned["logprobs"]["tokens"][0] != plain["logprobs"]["tokens"][0]


def test_chat_logprob_bytes_hold_partial_characters(http, llm):
    """A token that holds part of a UTF-8 character: its `token` text is U+FFFD, its `bytes` are its own,
    and the bytes of consecutive tokens join into the character (OpenAI's promise for `bytes`)."""
    first, second = llm.tokenizer.encode("🙂", add_special_tokens=False)[:2]
    body = {"messages": [{"role": "user", "content": "Smile"}], "max_tokens": 1, "temperature": 0, "logprobs": True}
    got = []
    for token in (first, second):
        r = http.post("/v1/chat/completions", json={**body, "logit_bias": {str(token): 100}}).json()
        entry = r["choices"][0]["logprobs"]["content"][0]
        assert "\ufffd" in entry["token"]
        got += entry["bytes"]
    assert bytes(got) == "🙂".encode()


def test_harmless_openai_fields_are_accepted(http):
    """What the openai client and chat front-ends send by default asks for nothing kvmini does not do."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0, "tools": [],
            "tool_choice": "auto", "parallel_tool_calls": False, "store": False, "metadata": {"run": "a"},
            "user": "u1", "response_format": {"type": "text"}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_generate_head_labels_so_far_every_n_tokens(http):
    """attention.head_stats_every: every n-th token's event carries the labels over the rows so far: the same as
    the final event of a request that ends there (greedy, so both see the same tokens)."""
    prompt = "A B C D A B C D A B"
    attention = {"layers": [17, 18], "top_k": 4, "head_stats_every": 2}
    with http.stream("POST", "/generate", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                "attention": attention}) as resp:
        events = sse_events(resp.iter_lines())
    tokens = events[:-1]
    assert ["attention_heads" in e for e in tokens] == [False, True, False, True, False]  # not the last token's:
    assert "attention_heads" in events[-1]  # the final event has them
    short = http.post("/generate", json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": False,
                                         "attention": {"layers": [17, 18], "top_k": 4}}).json()
    assert tokens[3]["attention_heads"] == short["attention_heads"]
    assert len(short["attention_heads"]) == 2 * 9
    r = http.post("/generate", json={"prompt": "x", "attention": {"head_stats": False, "head_stats_every": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "attention.head_stats_every"


def test_generate_span_masses_equal_the_library(live, http, llm):
    """Spans alone over HTTP: every layer, head-averaged, each token; the same numbers as the library's."""
    prompt = "Doc A: the sky is green. Doc B: the grass is blue. Question: what colour is the sky? Answer:"
    ids = llm.tokenizer.encode(prompt)
    a, b = prompt.index("Doc A"), prompt.index("Doc B")
    spans = [{"name": "a", "start_char": a, "end_char": b - 1}, {"name": "b", "start_char": b,
                                                               "end_char": prompt.index(" Question")}]
    n = 3
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "attention": {"spans": spans}}
    with http.stream("POST", "/generate", json=body) as resp:
        events = sse_events(resp.iter_lines())
    tokens, final = events[:-1], events[-1]
    assert len(tokens) == n and final["done"]
    assert "layers" not in tokens[0]["attention"]  # spans alone: no rows

    got_ids, want_spans = char_spans(llm.tokenizer, prompt, {
        "a": (a, b - 1), "b": (b, prompt.index(" Question"))})
    assert got_ids == ids
    capture = AttentionCapture(spans=want_spans)
    ref = live.on_engine_thread(lambda: llm.generate(ids, SamplingParams(temperature=0, max_tokens=n),
                                                     capture=capture)[0])
    for ev, rows in zip(tokens, ref.attention, strict=True):
        att = ev["attention"]["spans"]
        assert att["columns"] == ["a", "b", "generated", "rest_of_prompt"]
        assert set(att["layers"]) == {str(i) for i in range(llm.config.num_hidden_layers)}
        for layer, masses in rows.spans.head_mean().items():
            np.testing.assert_allclose(att["layers"][str(layer)], masses, atol=1e-6)
            assert abs(sum(att["layers"][str(layer)]) - 1) < 1e-4
    # Every captured head's scores and labels come on the final event.
    heads = final["attention_heads"]
    assert len(heads) == llm.config.num_hidden_layers * llm.config.num_attention_heads
    assert all(isinstance(h["label"], str) and "induction" in h["scores"] for h in heads)

    # Token spans with heads: per head; the prompt's matrix on the first event.
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "stream": False,
            "attention": {"layers": [2], "heads": [0, 1], "spans": [{"name": "x", "start": 1, "end": 4}],
                          "prefill_matrix": True, "head_stats": False}}
    r = http.post("/generate", json=body).json()
    att = r["tokens"][0]["attention"]
    assert np.array(att["spans"]["layers"]["2"]).shape == (2, 3)
    matrix = np.array(att["prefill_matrix"]["2"])
    assert matrix.shape == (2, len(ids), len(ids)) and np.allclose(matrix.sum(-1), 1, atol=1e-4)
    assert "attention_heads" not in r

    for spans, param in (([{"name": "x", "start": 0, "end": 999}], "attention.spans"),
                         ([{"name": "x", "start": 0, "end": 3}, {"name": "y", "start": 2, "end": 5}], "attention.spans"),
                         ([{"name": "x", "start": 0, "end_char": 3}], "attention.spans[0]"),
                         ([{"name": "x", "start_char": 0, "end_char": 3}], "attention.spans")):
        bad = {"prompt": ids, "max_tokens": 1, "attention": {"spans": spans}}  # token ids: no character spans
        assert_error(http.post("/generate", json=bad), 400, param)


# ---- errors ---------------------------------------------------------------------------------------------


def test_bad_inputs_give_openai_errors(live, http, llm):
    def post(path: str, body) -> httpx.Response:
        if isinstance(body, (bytes, str)):
            return http.post(path, content=body, headers={"content-type": "application/json"})
        return http.post(path, json=body)

    cases = [
        ("/v1/completions", b'{"prompt": "x",', 400, None),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "n": "2"}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
        ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "frobnicate": True}, 400, "frobnicate"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt[2]"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": [1] * (llm.max_model_len + 1), "max_tokens": 1}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1] * 8000, "max_tokens": 500}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 4000}, 400, "max_tokens"),  # more than the KV pool
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
         400, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50,
                                  "logprobs": True}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function", "function": {"name": "f x"}}]}, 400,
         "tools[0].function.name"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "xml"}}, 400, "response_format"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         400, "response_format.json_schema.schema"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "store": True}, 400, "store"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
         400, "tool_choice"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias.abc"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias[99999999]"),
        ("/generate", {"prompt": "x", "attention": {"layers": [99]}}, 400, "attention.layers"),
        ("/generate", {"prompt": "x", "attention": {"top_k": 10_000}}, 400, "attention.top_k"),
        ("/generate", {"prompt": "x", "max_tokens": 200, "attention": {}}, 400, "attention"),  # too large
        ("/generate", {"prompt": "x", "attention": {"heads": "all"}}, 400, "attention.heads"),
        ("/generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "prompt"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ]
    for path, body, status, param in cases:
        err = assert_error(post(path, body), status, param)
        assert err["type"] == "invalid_request_error", (path, body, err)
        assert http.get("/health").json() == {"status": "ok"}
    too_large = assert_error(post("/generate", {"prompt": "x", "max_tokens": 200, "attention": {}}), 400, "attention")
    assert "attention" in too_large["message"] and too_large["code"] == "attention_too_large"
    assert assert_error(post("/v1/completions", b"{bad"), 400)["code"] == "invalid_json"

    # unknown route, wrong method
    assert_error(http.post("/v1/nope", json={}), 404, None, "not_found")
    assert_error(http.get("/v1/completions"), 405)

    # 413: body over max_request_bytes (1 MiB)
    big = {"prompt": "x" * (2 << 20)}
    assert_error(http.post("/v1/completions", json=big), 413, None, "request_too_large")
    assert http.get("/health").status_code == 200

    # 401: wrong or missing key; /health stays open
    for headers in ({"Authorization": "Bearer wrong"}, {}, {"Authorization": KEY}):
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x"}, headers=headers)
        err = assert_error(r, 401, None, "invalid_api_key")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    assert live.state.engine_loop.stats["kv_blocks_used"] == 0
    assert metric(http.get("/metrics").text, 'kvmini_requests_total{status="rejected"}') >= len(cases)


def test_waiting_queue_full_gives_429(llm, live):
    # A second app over the same LLM; with max_waiting_requests=0 every generation request is refused
    # before it reaches the engine (so the two apps never drive the engine at once).
    app = create_app(llm, ServerSettings(api_key="other", max_waiting_requests=0))
    with LiveServer(app) as other:
        h = {"Authorization": "Bearer other"}
        for path, body in (("/v1/completions", {"prompt": "x"}), ("/generate", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            r = httpx.post(f"{other.url}{path}", json=body, headers=h)
            err = assert_error(r, 429, None, "rate_limit_exceeded")
            assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        assert_error(httpx.post(f"{other.url}/v1/completions", json={"prompt": "x"}, headers=AUTH), 401)
        assert httpx.get(f"{other.url}/health").status_code == 200
        text = httpx.get(f"{other.url}/metrics", headers=h).text
        assert metric(text, 'kvmini_requests_total{status="rejected"}') == 4


def test_a_failing_request_among_eight_streams_fails_alone(live, http, llm):
    # The poisoned request breaks every forward pass it is part of. Batched with 8 running streams, the
    # engine runs the step's sequences one by one, ends only the poisoned one, and the 8 give the text
    # each gives alone.
    prompts = [f"Tell me about the number {i}." for i in range(8)]
    body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    alone = [http.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
    poison = llm.tokenizer.encode("POISON")
    runner, real_run = llm.runner, llm.runner.run

    def run(work):
        if any(w.seq.token_ids[: len(poison)] == poison and w.seq.num_tokens > len(poison) + 2 for w in work):
            raise RuntimeError("injected failure")
        return real_run(work)

    def stream(body: dict) -> list:
        with httpx.Client(base_url=live.url, headers=AUTH, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                assert resp.status_code == 200
                return sse_events(resp.iter_lines())

    errors_before = metric(http.get("/metrics").text, 'kvmini_requests_total{status="error"}')
    live.on_engine_thread(lambda: setattr(runner, "run", run))
    try:
        with ThreadPoolExecutor(9) as pool:
            futures = [pool.submit(stream, {**body, "prompt": p}) for p in prompts]
            time.sleep(0.5)  # the 8 are running when the poisoned one joins
            bad = pool.submit(stream, {**body, "prompt": poison, "max_tokens": 30}).result()
            got = [f.result() for f in futures]
    finally:
        live.on_engine_thread(lambda: vars(runner).pop("run", None))
    errs = [e for e in bad if isinstance(e, dict) and "error" in e]
    assert len(errs) == 1 and "injected failure" in errs[0]["error"]["message"], bad
    assert errs[0]["error"]["type"] == "server_error" and bad[-1] == "[DONE]"
    for events, text in zip(got, alone):
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
    text = http.get("/metrics").text
    assert metric(text, 'kvmini_requests_total{status="error"}') == errors_before + 1
    assert metric(text, 'kvmini_errors_total{kind="engine:RuntimeError"}') >= 1
    assert metric(text, "kvmini_kv_blocks_used") == 0
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_hostile_inputs_get_a_400_naming_the_field(live, http, llm):
    vocab = llm.config.vocab_size
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = [
        # each of these used to be accepted and then fail the whole batch it ran in
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [99999999]},
         "stop_token_ids[0]"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stop_token_ids": [vocab]}, "stop_token_ids[0]"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stop_token_ids": [2**70]}, "stop_token_ids[0]"),
        ("/generate", {"prompt": "Hi", "max_tokens": 4, "stop_token_ids": [vocab + 5]}, "stop_token_ids[0]"),
        ("/v1/chat/completions", {**chat, "stop_token_ids": [1, vocab]}, "stop_token_ids[1]"),
        ("/v1/completions", {"prompt": "Hi", "temperature": 0.8, "top_k": 1180591620717411303424}, "top_k"),
        ("/v1/completions", {"prompt": "Hi", "temperature": 0.8, "top_k": 2**63}, "top_k"),
        ("/v1/completions", {"prompt": "Hi", "temperature": 1e300, "min_tokens": 2, "max_tokens": 4}, "temperature"),
        ("/v1/completions", {"prompt": "Hi", "repetition_penalty": 1e-300}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "Hi", "seed": 2**64}, "seed"),
        ("/v1/completions", {"prompt": "Hi", "seed": 2**64 - 1, "n": 2}, None),  # fine: choice 1 wraps
        # lone surrogates: not valid Unicode, cannot be tokenized
        ("/v1/completions", {"prompt": "abc\ud800def"}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "abc\ud800def"}]}, "messages[0].content"),
        ("/tokenize", {"prompt": "abc\ud800def"}, "prompt"),
        ("/generate", {"prompt": "abc\ud800def"}, "prompt"),
        ("/generate", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content"),
        ("/v1/completions", {"prompt": "Hi", "stop": ["ok", "\ud800"]}, "stop[1]"),
        # chat messages, field by field
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        # stop-string caps (16 strings of at most 256 characters by default)
        ("/v1/completions", {"prompt": "Hi", "n": 8, "stop": [f"s{i}" for i in range(10_000)]}, "stop"),
        ("/v1/completions", {"prompt": "Hi", "stop": ["x" * 257]}, "stop[0]"),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": 10**9}, "max_completion_tokens"),
    ]
    for path, body, param in cases:
        raw = json.dumps(body).encode()  # ASCII JSON: a lone surrogate travels as its escape, "\\ud800"
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        if param is None:
            assert r.status_code == 200, (body, r.text)
            continue
        err = assert_error(r, 400, param)
        assert err["type"] == "invalid_request_error", (path, body, err)
    message = assert_error(http.post("/v1/completions", json={"prompt": "Hi", "seed": 2**65}), 400, "seed")["message"]
    assert "2**65" in message or str(2**65) in message  # the value sent, not a wrapped one
    assert http.get("/health").json() == {"status": "ok"}
    assert live.state.engine_loop.stats["kv_blocks_used"] == 0
    text = http.get("/metrics").text
    assert metric(text, 'kvmini_errors_total{kind="400"}') >= len(cases) - 1
    assert "kvmini_preemptions_total" in text


def test_chat_template_failures_are_400(live, http, llm):
    templates = llm.tokenizer.chat_templates
    original = templates["default"]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    try:
        for template in ("{% include 'secret.txt' %}", "{% for i in range(10**9) %}x{% endfor %}"):
            templates["default"] = template
            for path in ("/v1/chat/completions", "/generate", "/tokenize"):
                err = assert_error(http.post(path, json={"messages": body["messages"]}), 400, "messages")
                assert "cannot apply the chat template" in err["message"]
    finally:
        templates["default"] = original
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_tokenizing_runs_off_the_event_loop(live, http, llm):
    tokenizer = llm.tokenizer
    threads = []
    real_encode = tokenizer.encode

    def encode(text, *args, **kwargs):
        threads.append(threading.current_thread())
        return real_encode(text, *args, **kwargs)

    tokenizer.encode = encode
    try:
        assert http.post("/tokenize", json={"prompt": "word " * 20_000}).json()["count"] >= 20_000
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 1}).status_code == 200
    finally:
        del tokenizer.encode
    assert len(threads) >= 3 and live.thread not in threads  # live.thread runs the event loop


# ---- small endpoints -----------------------------------------------------------------------------------


def test_tokenize_detokenize_models_metrics(http, llm):
    r = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == llm.tokenizer.encode(PROMPT) and r["count"] == len(r["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    r2 = http.post("/tokenize", json={"messages": messages}).json()
    assert r2["tokens"] == llm.chat_prompt(messages)
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": PROMPT}

    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    assert models["data"][0]["object"] == "model"
    assert http.get("/v1/models/smollm2-135m-instruct").json()["id"] == "smollm2-135m-instruct"

    resp = http.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for name in ("kvmini_requests_total", "kvmini_prompt_tokens_total", "kvmini_generation_tokens_total",
                 "kvmini_time_to_first_token_seconds", "kvmini_inter_token_latency_seconds",
                 "kvmini_requests_running", "kvmini_requests_waiting", "kvmini_kv_blocks_used",
                 "kvmini_kv_blocks_free", "kvmini_prefix_cache_hit_rate"):
        assert f"# TYPE {name} " in text
    # every sample line is `name{labels} value`
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("kvmini_")
    assert metric(text, "kvmini_time_to_first_token_seconds_count") >= 1
    assert metric(text, "kvmini_kv_blocks_free") == llm.blocks.allocator.num_blocks


# ---- CLI ------------------------------------------------------------------------------------------------


def test_serve_cli_arguments():
    from engine.cli import _parser
    from server.cli import parse_size

    args = _parser().parse_args(["serve", "--port", "9000", "--kv-cache-memory", "512M", "--api-key", "k"])
    assert (args.host, args.port, args.api_key, args.kv_cache_memory) == ("127.0.0.1", 9000, "k", "512M")
    assert args.func.__name__ == "_serve"
    assert [parse_size(s) for s in ("1024", "512M", "2G", "1.5GiB", "64k")] == [
        1024, 512 << 20, 2 << 30, 3 << 29, 64 << 10]
    with pytest.raises(ValueError):
        parse_size("lots")


def test_events_never_carry_a_raw_line_separator():
    from server.streaming import ndjson, sse

    text = "a\u2028b\u2029c\x85d\x0be\x1cf\r\ng"
    for frame in (sse({"text": text}), ndjson({"text": text})):
        body = frame.rstrip("\n")
        assert body.splitlines() == [body]  # str.splitlines: what httpx's iter_lines uses
        assert json.loads(body.removeprefix("data: "))["text"] == text


def test_cors_preflight_passes_the_api_key_and_requests_still_need_it(tmp_path):
    """--allowed-origins: a browser page on that origin may call the API; its preflight (which carries no
    credentials) is answered without the key, its requests are not. Other origins get no CORS headers."""
    from tests.checkpoints import make_checkpoint

    make_checkpoint(tmp_path, layers=1)
    origin = "http://localhost:3000"
    app = create_app(LLM(tmp_path, kv_cache_memory=1 << 20), ServerSettings(api_key=KEY, allowed_origins=(origin,)))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        pre = client.options("/v1/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        body = {"prompt": "ab", "max_tokens": 1}
        refused = client.post("/v1/completions", json=body, headers={"Origin": origin})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin  # readable
        ok = client.post("/v1/completions", json=body, headers={"Origin": origin, **AUTH})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
        other = client.post("/v1/completions", json=body, headers={"Origin": "http://evil.test", **AUTH})
        assert "access-control-allow-origin" not in other.headers
    with pytest.raises(ValueError, match="no path"):
        ServerSettings(allowed_origins=("http://x/path",))
    from server.cli import parse_origins

    assert parse_origins('["*"]') == ("*",) and parse_origins(None) == ()
    assert parse_origins("http://localhost:3000, https://app.example") == ("http://localhost:3000",
                                                                          "https://app.example")


def test_sse_streams_send_keepalive_comments_while_nothing_comes(tmp_path):
    """A long prefill keeps the first token away: the SSE stream sends `: keep-alive` comments meanwhile
    (clients skip comments), on completions, chat and /generate; NDJSON sends none."""
    from tests.checkpoints import make_checkpoint

    make_checkpoint(tmp_path, layers=1)
    llm = LLM(tmp_path, kv_cache_memory=1 << 20)
    step = llm.engine.step

    def slow_step():
        time.sleep(0.3)
        return step()

    llm.engine.step = slow_step
    app = create_app(llm, ServerSettings(sse_keepalive_s=0.05))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for path, body in (("/v1/completions", {"prompt": "ab", "max_tokens": 2, "stream": True}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2,
                                                     "stream": True}),
                           ("/generate", {"prompt": "ab", "max_tokens": 2})):
            with client.stream("POST", path, json=body) as r:
                lines = [line for line in r.iter_lines() if line]
            assert ": keep-alive" in lines, (path, lines)
            assert lines[-1] in ("data: [DONE]",) or '"done":true' in lines[-1]
        with client.stream("POST", "/generate", json={"prompt": "ab", "max_tokens": 2, "format": "ndjson"}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert all(line.startswith("{") for line in lines) and json.loads(lines[-1])["done"]


def test_tokenize_returns_each_tokens_text_when_asked(http, llm):
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi there"}], "return_token_texts": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_texts"] == [llm.tokenizer.decode([t], False) for t in body["tokens"]]
    assert "<|im_start|>" in body["token_texts"] and " there" in body["token_texts"]
    assert "token_texts" not in http.post("/tokenize", json={"prompt": "Hi"}).json()
