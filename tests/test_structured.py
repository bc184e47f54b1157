"""Structured outputs (engine/text/structured.py): JSON constrained by llguidance, from the sampler's masks to
`response_format` over HTTP. The tiny models have random weights, so their unconstrained output is byte
garbage: whatever JSON comes out is the constraint's doing."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from live_server import LiveServer

from checkpoints import make_checkpoint
from engine import LLM, RequestError, SamplingParams
from engine.sampling.sampler import Sampler, make_generator
from engine.text.structured import GrammarCompiler, GrammarError, StructuredOutput, TokenMasks, apply_masks
from server import ServerSettings, create_app

# Bounded strings, numbers and arrays, so that even a random model finishes the object in ~60-90 tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
PERSON = StructuredOutput(json=SCHEMA)


def assert_person(obj: object, max_name: int | None = 8) -> None:
    """`obj` matches SCHEMA (checked by hand: no JSON-schema validator is a dependency)."""
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "role", "tags"}, obj
    assert isinstance(obj["name"], str) and (max_name is None or len(obj["name"]) <= max_name)
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 120
    assert obj["role"] in ("admin", "user", "guest")
    assert isinstance(obj["tags"], list) and all(isinstance(t, str) for t in obj["tags"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "tiny"
    make_checkpoint(out, num_kv_heads=2, layers=2, hidden=64)
    return out


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir) -> LLM:
    return LLM(tiny_dir, dtype="float32")


# ---- the request's constraint ------------------------------------------------------------------------------


def test_structured_output_checks_its_fields():
    assert StructuredOutput(json='{"type": "object"}').json == {"type": "object"}
    assert StructuredOutput(json={"a": 1, "b": 2}).key == StructuredOutput(json={"b": 2, "a": 1}).key
    assert StructuredOutput(json_object=True).schema == {"type": "object"}
    cases = [
        (dict(), "structured_output"),
        (dict(json={"type": "object"}, json_object=True), "structured_output"),
        (dict(json="{not json"), "structured_output.json"),
        (dict(json=[1, 2]), "structured_output.json"),
        (dict(json={"x": float("nan")}), "structured_output.json"),
        (dict(json_object=1), "structured_output.json_object"),
    ]
    for kwargs, param in cases:
        with pytest.raises(RequestError) as e:
            StructuredOutput(**kwargs)
        assert e.value.param == param, kwargs
    with pytest.raises(RequestError) as e:
        SamplingParams(structured_output={"type": "object"})
    assert e.value.param == "structured_output"


def test_grammars_compile_once_per_schema_in_a_bounded_cache(tiny_llm):
    compiler = GrammarCompiler(tiny_llm.tokenizer, tiny_llm.engine.eos_token_ids, cache_size=2)
    first = compiler.matcher(PERSON)
    compiler.matcher(StructuredOutput(json=json.dumps(dict(reversed(SCHEMA.items())))))  # same schema, reordered
    assert len(compiler._templates) == 1
    compiler.compile(StructuredOutput(json_object=True))
    compiler.compile(StructuredOutput(json={"type": "array"}))
    assert list(compiler._templates) == ["json_object", StructuredOutput(json={"type": "array"}).key]
    assert not first.is_finished
    for schema, words in [({"type": "objectx"}, "objectx"), ({"type": "string", "pattern": "(("}, "unclosed"),
                          ({"$ref": "#/nope"}, "nope"),
                          ({"type": "string", "minLength": 3, "maxLength": 1}, "nsatisfiable")]:
        with pytest.raises(RequestError) as e:
            compiler.compile(StructuredOutput(json=schema))
        assert e.value.param == "structured_output.json" and words in e.value.message, e.value.message


# ---- the sampler's side ------------------------------------------------------------------------------------


def bitmask_of(allowed: list[set[int]], vocab_size: int) -> torch.Tensor:
    bits = torch.zeros(len(allowed), (vocab_size + 31) // 32 * 32, dtype=torch.bool)
    for j, ids in enumerate(allowed):
        bits[j, list(ids)] = True
    words = bits.view(len(allowed), -1, 32).long() << torch.arange(32)
    return words.sum(-1).to(torch.int64).to(torch.int32)  # wraps bit 31 to the sign bit, as llguidance's words


@pytest.mark.parametrize("batch, rows, width", [(1, [0], 300), (4, [1, 3], 300), (3, [0, 1, 2], 259), (2, [1], 200)])
def test_masks_keep_exactly_the_allowed_tokens(batch, rows, width):
    """Row by row, whatever the logits' width: tokens past the tokenizer's vocabulary are never allowed."""
    vocab_size = 259
    g = torch.Generator().manual_seed(0)
    allowed = [set(torch.randint(0, vocab_size, (40,), generator=g).tolist()) | {vocab_size - 1, 0} for _ in rows]
    logits = torch.randn(batch, width, generator=g)
    got = apply_masks(logits.clone(), rows, bitmask_of(allowed, vocab_size), vocab_size)
    want = logits.clone()
    for j, r in enumerate(rows):
        keep = torch.zeros(width, dtype=torch.bool)
        keep[[t for t in allowed[j] if t < width]] = True
        want[r] = torch.where(keep, logits[r], float("-inf"))
    assert torch.equal(got, want)


def test_sampler_picks_and_scores_within_the_mask():
    """Greedy takes the best allowed token; logprobs are those of the constrained distribution; the other rows
    sample exactly as without masks."""
    vocab_size, width = 259, 300
    logits = torch.randn(3, width, generator=torch.Generator().manual_seed(1))
    allowed = {5, 17, 200}
    params = [SamplingParams(temperature=0.0, logprobs=4), SamplingParams(temperature=0.0, logprobs=4),
              SamplingParams(temperature=1.0, seed=3)]
    masks = TokenMasks([1], bitmask_of([allowed], vocab_size), vocab_size)

    def sample(token_masks):
        return Sampler(0).sample(logits, params, [None, None, make_generator(3)], token_masks=token_masks)

    plain, masked = sample(None), sample(masks)
    best = max(allowed, key=lambda t: logits[1, t].item())
    assert masked.tolist() == [plain.tolist()[0], best, plain.tolist()[2]]
    constrained = torch.log_softmax(logits[1, sorted(allowed)], dim=-1)
    assert masked.logprobs[1] == pytest.approx(constrained.max().item(), abs=1e-5)
    assert masked.top_token_ids[1][:3] == sorted(allowed, key=lambda t: -logits[1, t].item())
    assert masked.top_logprobs[1][3] == float("-inf")  # only three tokens are allowed
    assert masked.logprobs[0] == plain.logprobs[0]


# ---- the engine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.9, 7), (1.0, 11)])
def test_json_schema_output_parses_and_matches(tiny_llm, temperature, seed):
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=200, structured_output=PERSON)
    for out in tiny_llm.generate(["Hello", [1, 2, 3], "Write JSON"], params):
        assert out.finish_reason == "stop" and out.stop_reason is None, out
        assert_person(json.loads(out.text))
        # Stopped on the closing brace: no step spent on EOS, and the text is every token's.
        assert out.token_ids[-1] not in tiny_llm.engine.eos_token_ids
        assert tiny_llm.tokenizer.decode(out.token_ids) == out.text


def test_without_the_constraint_the_tiny_model_writes_no_json(tiny_llm):
    out = tiny_llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_json_object_output_is_an_object(tiny_llm):
    out = tiny_llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=200,
                                                    structured_output=StructuredOutput(json_object=True)))[0]
    assert out.finish_reason == "stop"
    assert isinstance(json.loads(out.text), dict)


def test_a_constrained_request_leaves_its_batch_alone(tiny_llm):
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=200, structured_output=PERSON)
    alone = [tiny_llm.generate("abc", p)[0].token_ids for p in (plain, seeded)]
    outs = tiny_llm.generate(["abc", "Hello", "abc"], [plain, constrained, seeded])
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert_person(json.loads(outs[1].text))


def test_a_bad_schema_is_refused_when_the_request_is_added(tiny_llm):
    engine = tiny_llm.engine
    with pytest.raises(RequestError) as e:
        engine.add_request("x", SamplingParams(structured_output=StructuredOutput(json={"type": "objectx"})))
    assert e.value.param == "structured_output.json" and "objectx" in e.value.message
    assert not engine.has_unfinished() and not engine.requests


def test_max_tokens_can_cut_the_json(tiny_llm):
    out = tiny_llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=5, structured_output=PERSON))[0]
    assert out.finish_reason == "length" and out.num_output_tokens == 5
    assert out.text == '{"nam'  # one byte a token


def test_the_grammar_not_min_tokens_decides_the_end(tiny_llm):
    params = SamplingParams(temperature=0.0, max_tokens=200, min_tokens=190, structured_output=PERSON)
    out = tiny_llm.generate("Hello", params)[0]
    assert out.finish_reason == "stop" and out.num_output_tokens < 190
    assert_person(json.loads(out.text))


def test_constrained_logprobs_are_finite(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=200, logprobs=3, structured_output=PERSON)
    out = tiny_llm.generate("Hello", params)[0]
    assert len(out.logprobs) == out.num_output_tokens
    assert all(math.isfinite(lp.logprob) and lp.logprob <= 0 for lp in out.logprobs)
    # The first token is forced ('{' is the only way to start the object): probability 1 once constrained.
    assert out.logprobs[0].logprob == pytest.approx(0.0, abs=1e-6)
    assert out.logprobs[0].top[0][0] == out.logprobs[0].token_id


def test_a_failing_matcher_fails_only_its_request(tiny_llm):
    engine = tiny_llm.engine
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = tiny_llm.generate("ab", plain)[0].token_ids
    broken = engine.add_request("ab", SamplingParams(temperature=0.0, max_tokens=50, structured_output=PERSON))
    other = engine.add_request("ab", plain)

    def refuse(token_id: int) -> None:
        raise GrammarError(f"refused {token_id}")

    engine.requests[broken].grammar.accept = refuse
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final[broken].finish_reason == "error" and "refused" in final[broken].error
    assert final[other].finish_reason == "length" and final[other].token_ids == alone
    assert tiny_llm.blocks.allocator.num_used == 0


def test_a_session_refuses_a_constraint_it_would_bypass(tiny_llm):
    params = SamplingParams(structured_output=StructuredOutput(json_object=True))
    with pytest.raises(RequestError) as e:
        tiny_llm.session("ab", params=params)
    assert e.value.param == "structured_output"
    with tiny_llm.session("ab") as session, pytest.raises(RequestError):
        session.step(params)


def test_preemption_keeps_the_grammar_state(tiny_dir):
    """Recompute preemption replays the same tokens, so each matcher stays where its sequence is."""
    small = LLM(tiny_dir, block_size=4, num_blocks=40, max_num_seqs=4, enable_prefix_caching=False)
    big = LLM(tiny_dir, block_size=4, num_blocks=512)
    prompts = ["Hello", "abc", "Write JSON", [1, 2, 3]]
    params = [SamplingParams(temperature=0.0, max_tokens=100, structured_output=PERSON),
              SamplingParams(temperature=0.9, seed=4, max_tokens=100, structured_output=PERSON)] * 2
    want = [o.token_ids for o in big.generate(prompts, params)]
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == want
    for o in outs:
        if o.finish_reason == "stop":
            assert_person(json.loads(o.text))
    assert sum(o.finish_reason == "stop" for o in outs) >= 3


# ---- HTTP --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(tiny_llm):
    with LiveServer(create_app(tiny_llm, ServerSettings())) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client


RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Who are you?"}]


def test_response_format_on_every_generation_route(http):
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 200, "temperature": 0,
                                                   "response_format": RESPONSE_FORMAT})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert_person(json.loads(choice["message"]["content"]))

    completion = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 200, "temperature": 0,
                                                    "response_format": {"type": "json_object"}})
    assert completion.status_code == 200, completion.text
    c = completion.json()["choices"][0]
    assert c["finish_reason"] == "stop" and isinstance(json.loads(c["text"]), dict)

    generate = http.post("/generate", json={"prompt": "Hello", "max_tokens": 200, "stream": False, "temperature": 0,
                                            "response_format": RESPONSE_FORMAT})
    assert generate.status_code == 200, generate.text
    assert_person(json.loads(generate.json()["text"]))


def test_streamed_chat_deltas_join_into_the_json(http):
    body = {"messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True,
            "response_format": RESPONSE_FORMAT}
    text, reasons = "", []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                reasons.append(choice["finish_reason"])
    assert reasons[-1] == "stop"
    assert_person(json.loads(text))


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objectx"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/definitions/nope"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "p"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "extra": 1}},
     "response_format.json_schema.extra"),
    ({"type": "xml"}, "response_format"),
    ({"type": "json_object", "schema": {}}, "response_format.schema"),
    ("json", "response_format"),
])
def test_a_bad_response_format_is_a_400_naming_the_field(http, response_format, param):
    for path, body in [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"}),
                       ("/generate", {"prompt": "x", "stream": False})]:
        r = http.post(path, json={**body, "max_tokens": 4, "response_format": response_format})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == param, (path, r.json())


# ---- the default model -------------------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.slow
def test_openai_client_gets_schema_valid_json_from_the_default_model(smollm2_dir):
    openai = pytest.importorskip("openai")
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "name": {"type": "string"}}}
    llm = LLM(smollm2_dir, dtype="float32", kv_cache_memory=32 << 20)
    with LiveServer(create_app(llm, ServerSettings())) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Describe Ada Lovelace as a JSON object with her name, age, "
                                                  "role and some tags."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                    "strict": True}},
            max_tokens=120, temperature=0, logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    person = json.loads(choice.message.content)
    assert_person(person, max_name=None)
    assert "Ada" in person["name"]
    assert all(math.isfinite(t.logprob) for t in choice.logprobs.content)
