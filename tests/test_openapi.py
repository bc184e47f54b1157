"""The OpenAPI spec tells the truth: schemathesis runs every operation of /openapi.json against a live
server (a tiny random model, so a generation is milliseconds) and checks each answer: no 5xx, a
documented status, content type, body schema and headers, and that requests the spec calls invalid
are refused. Then the statuses it cannot provoke (401, 413, 429, 404) are checked against the spec by hand.

Bounded and deterministic: `MAX_EXAMPLES` cases per operation (positive and negative), derandomized,
no example database.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings  # hypothesis comes with schemathesis
from live_server import LiveServer
from schemathesis import GenerationMode

from checkpoints import make_checkpoint
from engine import LLM
from engine.core.checks import CHAT_ROLES as ENGINE_CHAT_ROLES
from server import ServerSettings, create_app
from server.protocol import CHAT_ROLES

pytestmark = pytest.mark.slow

KEY = "openapi-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 30
MAX_MODEL_LEN = 256  # bounds every generation: max_tokens beyond the context is a 400
SETTINGS = ServerSettings(api_key=KEY, max_n=2, max_attention_values=20_000, max_attention_top_k=8,
                          max_request_bytes=64 << 10)
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
]
OPERATIONS = [
    "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses", "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /generate", "POST /tokenize", "POST /detokenize", "GET /health", "GET /metrics",
]

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    out = tmp_path_factory.mktemp("openapi") / "tiny"
    make_checkpoint(out, num_kv_heads=1, num_heads=2, hidden=32, layers=1)
    return LLM(out, dtype="float32", num_blocks=64, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def live(tiny_llm):
    with LiveServer(create_app(tiny_llm, SETTINGS)) as server:
        yield server


def _config():
    # The key is sent by the test (`case.call(headers=AUTH)`), not generated from the security scheme;
    # 401 is tested below. Example counts and derandomizing are Hypothesis settings on the test.
    return schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=_config(), headers=AUTH)


def _checks():
    from schemathesis import checks

    return [getattr(checks, name) for name in CHECKS]


# One test per operation, cases drawn with Hypothesis from schemathesis' strategies. (Not
# `schemathesis.pytest.from_fixture(...).parametrize()`: with pytest 9 it fails on `request.node._nodeid`.)
@pytest.mark.parametrize("label", OPERATIONS)
def test_spec_conformance(api_schema, label):
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)
    checks = _checks()

    statuses: dict[int, int] = {}

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def run(case):
        response = case.call(headers=AUTH, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks)

    run()
    print(f"\nschemathesis {label}: {json.dumps(dict(sorted(statuses.items())))}")
    if method == "POST":  # the run means something: some cases were served, some refused
        assert statuses.get(200), (label, statuses)
        assert statuses.get(400) or statuses.get(404), (label, statuses)


def test_every_operation_is_tested(api_schema):
    ops = [f"{op.method.upper()} {op.path}" for op in (r.ok() for r in api_schema.get_all_operations())]
    assert sorted(ops) == sorted(OPERATIONS)


# ---- the statuses schemathesis does not provoke -----------------------------------------------------------


def _validate(api_schema, label: str, response: httpx.Response, body=None) -> None:
    """Check a response the test provoked by hand: documented status, content type, body and headers."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    kwargs = {"body": body} if body is not None else {}
    if "{model_id}" in path:
        kwargs["path_parameters"] = {"model_id": "nope"}
    case = operation.Case(**kwargs)
    from schemathesis import checks

    case.validate_response(response, checks=[checks.status_code_conformance, checks.content_type_conformance,
                                             checks.response_schema_conformance,
                                             checks.response_headers_conformance])


WRONG_MODEL_BODIES = {
    "POST /v1/completions": {"model": "nope", "prompt": "x"},
    "POST /v1/chat/completions": {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    "POST /generate": {"model": "nope", "prompt": "x"},
    "POST /tokenize": {"model": "nope", "prompt": "x"},
    "POST /detokenize": {"model": "nope", "tokens": [1]},
}


def test_documented_error_statuses(live, api_schema):
    spec = api_schema.raw_schema
    assert spec["components"]["securitySchemes"] == {
        "bearerAuth": {"type": "http", "scheme": "bearer", "description": "the server's API key"}}
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for label in OPERATIONS:
            method, path = label.split(" ", 1)
            url = path.replace("{model_id}", "nope")
            body = WRONG_MODEL_BODIES.get(label)
            op = spec["paths"][path][method.lower()]
            # 401 without the key, except on /health
            r = http.request(method, url, json=body)
            if path == "/health":
                assert r.status_code == 200 and "401" not in op["responses"] and op["security"] == []
            else:
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (label, r.text)
                assert op["security"] == [{"bearerAuth": []}]
                _validate(api_schema, label, r, body)
            # 404 for a model this server does not serve
            if body is not None or "{model_id}" in path:
                r = http.request(method, url, json=body, headers=AUTH)
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (label, r.text)
                _validate(api_schema, label, r, body)
            # 413 for a body over max_request_bytes
            if method == "POST":
                big = {"prompt": "x" * (SETTINGS.max_request_bytes + 1)}
                r = http.request(method, url, json=big, headers=AUTH)
                assert r.status_code == 413, (label, r.text)
                _validate(api_schema, label, r, big)


def test_429_and_503_are_documented_on_generation_routes(tiny_llm, api_schema):
    # A second app over the same LLM that refuses every generation request before it reaches the engine:
    # 429 (queue full), then 503 (draining for shutdown).
    app = create_app(tiny_llm, ServerSettings(api_key=KEY, max_waiting_requests=0))
    bodies = {
        "POST /v1/completions": {"prompt": "x", "max_tokens": 1},
        "POST /v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        "POST /generate": {"prompt": "x", "max_tokens": 1},
    }
    with LiveServer(app) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        for label, body in bodies.items():
            r = http.post(label.split(" ", 1)[1], json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            _validate(api_schema, label, r, body)
        server.state.engine_loop.draining = True
        for label, body in bodies.items():
            r = http.post(label.split(" ", 1)[1], json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
            _validate(api_schema, label, r, body)


# ---- what the spec states ---------------------------------------------------------------------------------


def test_spec_states_statuses_streams_and_limits(api_schema, tiny_llm):
    spec = api_schema.raw_schema
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    gen = spec["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    assert set(gen) == {"application/json", "text/event-stream", "application/x-ndjson"}
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}

    schemas = spec["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    vocab_max = tiny_llm.config.vocab_size - 1
    assert completion["n"]["minimum"] == 1 and completion["n"]["maximum"] == SETTINGS.max_n
    ids = next(m for m in completion["prompt"]["anyOf"] if m.get("items", {}).get("type") == "integer")
    assert ids["minItems"] == 1 and ids["items"]["minimum"] == 0 and ids["items"]["maximum"] == vocab_max
    assert {"type": "string", "minLength": 1} in completion["prompt"]["anyOf"]
    assert {"type": "integer", "minimum": 0, "maximum": 20} in completion["logprobs"]["anyOf"]
    chat_req = schemas["ChatCompletionRequest"]["properties"]
    assert chat_req["messages"]["minItems"] == 1
    assert {"type": "integer", "minimum": 0, "maximum": 20} in chat_req["top_logprobs"]["anyOf"]
    roles = [schemas[ref["$ref"].rsplit("/", 1)[1]] for ref in chat_req["messages"]["items"]["oneOf"]]
    assert [r["properties"]["role"]["const"] for r in roles] == list(CHAT_ROLES) == list(ENGINE_CHAT_ROLES)
    for r in roles:  # content is required, except on an assistant message
        assert ("content" in r.get("required", [])) == (r["properties"]["role"]["const"] != "assistant")
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == vocab_max
    attention = schemas["AttentionRequest"]["properties"]
    assert attention["top_k"]["anyOf"][0]["maximum"] == SETTINGS.max_attention_top_k


def test_no_api_key_no_security(tiny_llm):
    from fastapi.testclient import TestClient

    spec = TestClient(create_app(tiny_llm, ServerSettings())).get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    for item in spec["paths"].values():
        for op in item.values():
            assert "401" not in op["responses"] and "security" not in op


# ---- error messages name the field --------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "words"), [
    (None, None, "request body is missing"),
    (b"null", None, "request body is missing"),
    (b"[1]", None, "must be a JSON object"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "a string or an array of text parts"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing required parameter"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "system, developer, user, assistant, tool"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "missing required parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type", "'text'"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"messages": [{"role": "user", "content": "x"}], "a b": 1}, "\"a b\"", "unrecognized request argument"),
])
def test_chat_validation_errors(live, body, param, words):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as http:
        if isinstance(body, bytes):
            r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        elif body is None:
            r = http.post("/v1/chat/completions")
        else:
            r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": []}, "prompt", "at least 1 item"),
    ({"prompt": [-1]}, "prompt[0]", "greater than or equal to 0"),
    ({"prompt": None}, "prompt", "expected a string, an array of integers"),
    ({"prompt": ["a", ""]}, "prompt[1]", "at least 1 character"),
    ({"prompt": [[1], []]}, "prompt[1]", "at least 1 item"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "0 only with echo"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop[1]", "at least 1 character"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids[0]", "greater than or equal to 0"),
])
def test_completion_validation_errors(live, body, param, words):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_whole_floats_are_integers(live):
    # JSON Schema's "integer" includes 2.0, so the server takes it as 2; 2.5 stays an error.
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as http:
        r = http.post("/v1/completions", json={"prompt": [1.0, 2], "max_tokens": 2.0, "n": 1.0, "logprobs": 0.0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
                                     "prompt_tokens_details": {"cached_tokens": 0}}
        err = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2.5}).json()["error"]
        assert err["param"] == "max_tokens" and "valid integer" in err["message"]


def test_assistant_message_may_omit_content(live):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                         {"role": "user", "content": [{"type": "text", "text": "again"}]}], "max_tokens": 2}
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
