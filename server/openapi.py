"""The OpenAPI spec (`GET /openapi.json`, shown at `/docs`) as the server really answers.

FastAPI's own spec documents a 422 for every body it validates and nothing else; this server turns
every validation error into an OpenAI-style 400 (`server/errors.py`), refuses bad keys (401) and big
bodies (413) in its middleware, and streams. `install_openapi(app, state)` replaces `app.openapi` so
the spec, built once, says:

* every status an operation can answer, each error with the `ErrorResponse` body
  (`{"error": {"message", "type", "param", "code"}}`): 400 (any request body), 401 (with an API key
  set: every route but `GET /health` and the page at `GET /`, also declared as the `bearerAuth` security scheme), 404
  (unknown `model`), 413 (request body over `max_request_bytes`), 429 (generation routes, with
  `Retry-After`), 500 (unexpected failures; engine failures on generation routes), 503 (generation
  routes, while the server drains on shutdown; they and `GET /health` once the engine is dead);
* the success bodies (`application/json`), and next to them the streams: `text/event-stream` for
  `stream: true` (and `/generate`'s default), `application/x-ndjson` for `/generate` `format: ndjson`.
  For `text/event-stream` the schema describes one event (`{"data": ...}`, as OpenAPI 3.2's
  `itemSchema` does, and as schemathesis reads 3.1 specs): `data` is `[DONE]` or a JSON chunk;
* the request constraints of `server/protocol.py`, plus the ones this app's model and settings fix:
  `model` is the served id, token ids below the vocabulary size, `max_tokens` below the context
  length, `n <= max_n`, the stop-string caps, attention layers / heads / top_k within the model and
  `max_attention_top_k`.

The spec is tested against the live server by schemathesis (`tests/test_openapi.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from server.state import ServerState

# ---- response bodies -------------------------------------------------------------------------------------
# Documentation only: handlers build plain dicts; tests/test_openapi.py checks they match these.


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_texts: list[str] | None = Field(default=None, description="with return_token_texts")


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens found in the prefix cache (whole KV blocks)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """With `echo`, the prompt's tokens lead; the first has no logprob (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One `stream: true` event; the last one (`stream_options.include_usage`) has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of an object that matches the function's parameters")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the reply is tool calls alone")
    tool_calls: list[ToolCall] | None = Field(default=None, description="complete calls of declared functions "
                                                                        "(finish_reason tool_calls)")


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDeltaFunction(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    """A call's first delta has its id, type and name; the next ones pieces of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallDeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One `stream: true` event; the last one (`stream_options.include_usage`) has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class GenerateTopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class AttentionHead(BaseModel):
    """One captured head's pattern scores and labels (docs/ATTENTION.md)."""

    layer: int
    head: int
    label: str
    secondary: str | None
    score: float | None
    scores: dict[str, float | None]
    detail: dict[str, Any]


class GenerateTokenEvent(BaseModel):
    """One generated token (see server/native_api.py for `attention`)."""

    token_id: int
    text: str
    logprob: float | None
    top_logprobs: list[GenerateTopLogprob] | None = None  # only when `logprobs` was given
    position: int
    attention: dict[str, Any] | None = None  # only when `attention` was asked for
    attention_heads: list[AttentionHead] | None = None  # every `attention.head_stats_every`-th token


class GenerateFinalEvent(BaseModel):
    done: Literal[True]
    finish_reason: str | None
    stop_reason: int | str | None
    text: str
    token_ids: list[int]
    usage: Usage
    attention_heads: list[AttentionHead] | None = Field(
        default=None, description="with attention (unless head_stats is false): every captured head")


class Generation(GenerateFinalEvent):
    """`stream: false`: every token event under `tokens`, and the final event's fields."""

    id: str
    object: Literal["generation"]
    created: int
    model: str
    tokens: list[GenerateTokenEvent]


class ResponseOutputItem(BaseModel):
    """A `message` (role assistant, `content` of output_text parts) or a `function_call` (call_id, name,
    arguments)."""

    id: str
    type: Literal["message", "function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] | None = None
    content: list[dict[str, Any]] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class Response(BaseModel):
    """OpenAI's Response object (stateless: `store` is false)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, str] | None
    incomplete_details: dict[str, str] | None
    model: str
    output: list[ResponseOutputItem]
    usage: ResponseUsage | None
    store: Literal[False]


class ResponseStreamEvent(BaseModel):
    """One typed event (also the SSE `event:` name): response.created, response.in_progress,
    response.output_item.added / .done, response.content_part.added / .done, response.output_text.delta /
    .done, response.function_call_arguments.delta / .done, and last response.completed (or
    response.incomplete, response.failed)."""

    type: str
    sequence_number: int
    response: Response | None = None


RESPONSE_MODELS = (
    ErrorResponse, Health, ModelList, ModelCard, TokenizeResponse, DetokenizeResponse, Completion, CompletionChunk,
    ChatCompletion, ChatCompletionChunk, Generation, GenerateTokenEvent, GenerateFinalEvent, Response,
    ResponseStreamEvent,
)

# ---- operations ------------------------------------------------------------------------------------------

JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
SSE_DONE = "[DONE]"

STATUS_TEXT = {
    400: "Invalid request: bad JSON, a wrong type, an unknown field or a value out of range (`param` names the "
         "field), a prompt longer than the context (`context_length_exceeded`), ...",
    401: "Missing or wrong `Authorization: Bearer <key>` (`invalid_api_key`)",
    404: "The `model` is not the one this server serves (`model_not_found`)",
    413: "The request body is larger than the server's limit (`request_too_large`)",
    429: "Too many requests waiting (`rate_limit_exceeded`); retry after `Retry-After` seconds",
    500: "Engine failure or unexpected error",
    503: "The server is shutting down (`shutting_down`): it finishes what it has, accepts nothing new; or its "
         "engine can no longer run (`engine_dead`: a tensor-parallel rank exited)",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _sse(*payloads: str, done: bool) -> dict:
    """The schema of one SSE event whose `data` is one of `payloads` as JSON (or `[DONE]` when `done`)."""
    content = {"contentMediaType": JSON, "contentSchema": {"anyOf": [_ref(p) for p in payloads]}}
    data: dict = {"type": "string", "description": "a JSON object" + (f", or `{SSE_DONE}` at the end" if done else "")}
    data.update({"if": {"const": SSE_DONE}, "then": True, "else": content} if done else content)
    return {"type": "object", "required": ["data"], "properties": {"data": data},
            "description": "one server-sent event (`data: <json>`)"}


@dataclass(frozen=True)
class Op:
    ok: dict[str, dict]  # media type -> schema of the 200 body (one event for text/event-stream)
    errors: tuple[int, ...]  # besides 401, which every route but /health answers when an API key is set
    ok_text: str = "Success"
    headers: dict[int, dict] = field(default_factory=dict)


GENERATION_ERRORS = (400, 404, 413, 429, 500, 503)
BODY_ERRORS = (400, 404, 413, 500)

OPERATIONS: dict[tuple[str, str], Op] = {
    ("post", "/v1/completions"): Op(
        {JSON: _ref("Completion"), SSE: _sse("CompletionChunk", "ErrorResponse", done=True)}, GENERATION_ERRORS,
        "The completion (`application/json`), or with `stream: true` its chunks as server-sent events, "
        f"ending with `data: {SSE_DONE}` (an engine failure mid-stream sends an error object first)"),
    ("post", "/v1/chat/completions"): Op(
        {JSON: _ref("ChatCompletion"), SSE: _sse("ChatCompletionChunk", "ErrorResponse", done=True)},
        GENERATION_ERRORS,
        "The chat completion (`application/json`), or with `stream: true` its chunks as server-sent events, "
        f"ending with `data: {SSE_DONE}` (an engine failure mid-stream sends an error object first)"),
    ("post", "/v1/responses"): Op(
        {JSON: _ref("Response"), SSE: _sse("ResponseStreamEvent", done=False)}, GENERATION_ERRORS,
        "The response (`application/json`), or with `stream: true` its typed events as server-sent events, the "
        "last one response.completed, response.incomplete or response.failed"),
    ("post", "/generate"): Op(
        {JSON: _ref("Generation"),
         SSE: _sse("GenerateTokenEvent", "GenerateFinalEvent", "ErrorResponse", done=False),
         NDJSON: {"type": "string", "description": "one JSON object per line: a `GenerateTokenEvent` per token, "
                                                   "then the `GenerateFinalEvent` (or an `ErrorResponse`)"}},
        GENERATION_ERRORS,
        "By default (`stream: true`, `format: sse`) one server-sent event per token, then the final event "
        "(`done: true`); `format: ndjson` sends the same objects as JSON lines; `stream: false` one JSON object"),
    ("post", "/tokenize"): Op({JSON: _ref("TokenizeResponse")}, BODY_ERRORS),
    ("post", "/detokenize"): Op({JSON: _ref("DetokenizeResponse")}, BODY_ERRORS),
    ("get", "/v1/models"): Op({JSON: _ref("ModelList")}, (500,)),
    ("get", "/v1/models/{model_id}"): Op({JSON: _ref("ModelCard")}, (404, 500)),
    ("get", "/health"): Op({JSON: _ref("Health")}, (503,)),
    ("get", "/metrics"): Op({"text/plain": {"type": "string", "description": "Prometheus text format 0.0.4"}},
                            (500,)),
}
OPEN_OPERATIONS = {("get", "/health")}  # no API key needed (server/middleware.py OPEN_PATHS)

RESPONSE_HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string", "const": "Bearer"}}},
    429: {"Retry-After": {"required": True, "description": "seconds", "schema": {"type": "integer", "minimum": 0}}},
}


def install_openapi(app: FastAPI, state: ServerState) -> None:
    """Make `app.openapi()` (hence /openapi.json and /docs) return `build_openapi(app, state)`, built once."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, state)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI, state: ServerState) -> dict:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _add_models(schemas)
    authed = state.settings.api_key is not None
    if authed:
        components["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "the server's API key"}}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            op = OPERATIONS.get((method, path))
            if op is None:
                raise RuntimeError(f"{method.upper()} {path} is not documented in server/openapi.py OPERATIONS")
            needs_key = authed and (method, path) not in OPEN_OPERATIONS
            operation["responses"] = _responses(op, needs_key)
            if authed:
                operation["security"] = [{"bearerAuth": []}] if needs_key else []
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 bodies, no longer referenced
        schemas.pop(name, None)
    _int_bounds(schemas)
    _state_limits(schemas, state)
    for parameter in schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
        if parameter["name"] == "model_id":
            parameter["schema"]["enum"] = [state.model_name]
            parameter["description"] = "the served model's id; any other is a 404"
    return schema


def _responses(op: Op, needs_key: bool) -> dict:
    out: dict[str, dict] = {"200": {"description": op.ok_text, "content": {t: {"schema": s} for t, s in op.ok.items()}}}
    for status in sorted(op.errors + ((401,) if needs_key else ())):
        response = {"description": STATUS_TEXT[status], "content": {JSON: {"schema": _ref("ErrorResponse")}}}
        if status in RESPONSE_HEADERS:
            response["headers"] = RESPONSE_HEADERS[status]
        out[str(status)] = response
    return out


def _add_models(schemas: dict) -> None:
    _, defs = models_json_schema([(m, "validation") for m in RESPONSE_MODELS],
                                 ref_template="#/components/schemas/{model}")
    for name, definition in defs.get("$defs", {}).items():
        if name in schemas and schemas[name] != definition:
            raise RuntimeError(f"response schema {name} clashes with a request schema of the same name")
        schemas[name] = definition


def _state_limits(schemas: dict, state: ServerState) -> None:
    """The limits this app's model and settings fix, on the request schemas of server/protocol.py."""
    cfg, settings = state.llm.config, state.settings
    vocab_max = cfg.vocab_size - 1
    max_tokens = state.llm.max_model_len - 1  # the prompt has at least one token

    def props(model: str) -> dict:
        return schemas[model]["properties"]

    def bound(node: dict, **limits) -> None:
        """Set `maximum` on the integers of a field's schema (through anyOf and array items), or
        `maxItems` on its arrays."""
        if "anyOf" in node:
            for member in node["anyOf"]:
                bound(member, **limits)
            return
        kind = node.get("type")
        if kind == "array" and "maxItems" not in limits:
            bound(node["items"], **limits)
            return
        for key, value in limits.items():
            if (key == "maximum" and kind == "integer") or (key == "maxItems" and kind == "array"):
                node[key] = value

    # `model`: the served id (or null / absent); any other is a 404.
    for name, schema in schemas.items():
        if name.endswith("Request") and "model" in schema.get("properties", {}):
            for member in schema["properties"]["model"].get("anyOf", []):
                if member.get("type") == "string":
                    member["enum"] = [state.model_name]
    for model in ("CompletionRequest", "GenerateRequest"):
        bound(props(model)["prompt"], maximum=vocab_max)
    for model in ("CompletionRequest", "ChatCompletionRequest", "GenerateRequest"):
        p = props(model)
        bound(p["stop_token_ids"], maximum=vocab_max)
        if model != "ChatCompletionRequest":  # chat ignores max_tokens when max_completion_tokens is given
            bound(p["max_tokens"], maximum=max_tokens)
        bound(p["stop"], maxItems=settings.max_stop_strings)
        _stop_lengths(p["stop"], settings.max_stop_length)
    chat = props("ChatCompletionRequest")
    bound(chat["max_completion_tokens"], maximum=max_tokens)
    chat["max_tokens"] = {**chat["max_tokens"], "description": (
        f"at most {max_tokens} (the context length - 1); ignored when max_completion_tokens is given")}
    bound(props("DetokenizeRequest")["tokens"], maximum=vocab_max)
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        bound(props(model)["n"], maximum=settings.max_n)
    attention = props("AttentionRequest")
    bound(attention["layers"], maximum=cfg.num_hidden_layers - 1)
    bound(attention["heads"], maximum=cfg.num_attention_heads - 1)
    bound(attention["top_k"], maximum=settings.max_attention_top_k)


def _int_bounds(node: Any) -> None:
    """FastAPI's OpenAPI models hold bounds as floats (`"minimum": 0.0`); an integer's are ints again."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _int_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _int_bounds(value)


def _stop_lengths(node: dict, max_length: int) -> None:
    for member in node.get("anyOf", [node]):
        if member.get("type") == "string":
            member["maxLength"] = max_length
        elif member.get("type") == "array":
            member["items"]["maxLength"] = max_length
