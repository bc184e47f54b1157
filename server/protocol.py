"""Request bodies (pydantic). Types are strict: `"0.5"` is not a number, `1` is not a bool, `0.5` is
not an integer; but a whole number written `5.0` is the integer 5, as JSON Schema's "integer" (and
so the OpenAPI spec) says.

Unknown fields are refused (400 naming the field), as OpenAI does. The constraints written here
(ranges, non-empty lists and prompts, chat roles) are the ones the engine enforces anyway; stating
them on the models puts them in the OpenAPI spec (`/openapi.json`) and refuses a bad value before
anything runs. Every failure becomes a 400 naming the field (`server/errors.py`). Rules that depend
on the model or the server's settings (vocabulary size, context length, `max_n`, ...) are checked by
`server/params.py` and the engine, and stated in the spec by `server/openapi.py`.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, StrictBool, StrictStr, Tag

from engine.cache.kv_policy import KV_POLICY_PATTERN
from engine.core.checks import INT32_END, SEED_END, SEED_MIN
from engine.sampling.params import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS
from engine.text.tool_calls import MAX_TOOLS, TOOL_NAME_PATTERN


def _whole_float_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


FLOAT32_MAX = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]  # sampling runs in float32


def _int(**bounds: int) -> Any:
    """A JSON integer (5 or 5.0; not 5.5, "5" or true) within `bounds` (ge, lt, ...). The bounds go
    before the float-to-int step, so they reach the JSON schema as minimum / maximum."""
    return Annotated[int, Strict(), Field(**bounds), BeforeValidator(_whole_float_to_int)]


NonNegInt = _int(ge=0)
PositiveInt = _int(ge=1)
TokenId = NonNegInt
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Logprobs = _int(ge=0, le=MAX_LOGPROBS)
TopK = _int(ge=-1, lt=INT32_END)
Seed = _int(ge=SEED_MIN, lt=SEED_END)
# A JSON number: ints are accepted (as floats); bools, strings, NaN and Infinity are not. The engine
# also refuses a non-zero number float32 rounds to zero (|x| <= 2**-150); the schema says so.
_FLUSHED_TO_ZERO = {"type": "number", "anyOf": [{"exclusiveMinimum": 0, "maximum": 2.0**-150},
                                                {"minimum": -(2.0**-150), "exclusiveMaximum": 0}]}
Number = Annotated[float, Strict(), Field(allow_inf_nan=False, json_schema_extra={"not": _FLUSHED_TO_ZERO})]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- chat messages ---------------------------------------------------------------------------------------


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


Content = StrictStr | Annotated[list[TextPart], Field(min_length=1)]


class _Message(BaseModel):
    """Extra keys (name, tool_calls, tool_call_id, ...) are passed through to the chat template."""

    model_config = ConfigDict(extra="allow")

    def template_dict(self) -> dict:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = "".join(p.text for p in self.content)
        return d


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


ToolName = Annotated[StrictStr, Field(pattern=f"^{TOOL_NAME_PATTERN.pattern}$")]


class CalledFunction(_Body):
    name: ToolName
    arguments: StrictStr = Field(description="the arguments as JSON text (an object)")


class AssistantToolCall(_Body):
    id: Annotated[StrictStr, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(_Message):
    """`content` may be absent or null (OpenAI allows that next to `tool_calls`); the chat template
    then gets `""`, which every template can render."""

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[AssistantToolCall] | None = None

    def template_dict(self) -> dict:
        d = super().template_dict()
        d.setdefault("content", "")
        return d


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: StrictStr = Field(description="the id of the assistant's call this answers")


MESSAGE_CLASSES = {
    "system": SystemMessage,
    "developer": DeveloperMessage,
    "user": UserMessage,
    "assistant": AssistantMessage,
    "tool": ToolMessage,
}
CHAT_ROLES = tuple(MESSAGE_CLASSES)
INVALID_ROLE = "invalid_role"  # the pydantic error type of a missing or unknown role (see server/errors.py)


def _message_tag(value: Any) -> str | None:
    """The message class for `value` by its role; None (-> an `invalid_role` error) for a missing or
    unknown role. A value that is not an object goes to UserMessage, which reports it as such."""
    if isinstance(value, BaseModel):
        return type(value).__name__
    if not isinstance(value, dict):
        return UserMessage.__name__
    role = value.get("role")
    cls = MESSAGE_CLASSES.get(role) if isinstance(role, str) else None
    return cls.__name__ if cls is not None else None


# One message, chosen by its role. The tags are the class names (capitalised, so they never show up
# in an error's field path; see `server.errors.param_from_loc`).
ChatMessage = Annotated[
    Union[tuple(Annotated[cls, Tag(cls.__name__)] for cls in MESSAGE_CLASSES.values())],  # type: ignore[misc]  # noqa: UP007
    Discriminator(
        _message_tag,
        custom_error_type=INVALID_ROLE,
        custom_error_message=f"role must be one of {', '.join(CHAT_ROLES)}",
    ),
]
Messages = Annotated[list[ChatMessage], Field(min_length=1)]


# ---- response_format ------------------------------------------------------------------------------------


class TextResponseFormat(_Body):
    type: Literal["text"]


class JsonObjectResponseFormat(_Body):
    type: Literal["json_object"]


class JsonSchemaSpec(_Body):
    """OpenAI's `json_schema`. `strict` is accepted and changes nothing: the output always matches the schema."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output matches (one the "
                                                                 "engine cannot compile: 400)")
    strict: StrictBool | None = None


class JsonSchemaResponseFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


RESPONSE_FORMATS = {"text": TextResponseFormat, "json_object": JsonObjectResponseFormat,
                    "json_schema": JsonSchemaResponseFormat}


def _format_tag(value: Any) -> str | None:
    """The response_format class for `value` by its type; None (-> an error naming the types) for another type.
    A value that is not an object goes to TextResponseFormat, which reports it as such."""
    if isinstance(value, BaseModel):
        return type(value).__name__
    if not isinstance(value, dict):
        return TextResponseFormat.__name__
    cls = RESPONSE_FORMATS.get(value["type"]) if isinstance(value.get("type"), str) else None
    return cls.__name__ if cls is not None else None


# Chosen by `type`; tagged by class name, as ChatMessage (so the tags stay out of an error's field path).
ResponseFormat = Annotated[
    Union[tuple(Annotated[cls, Tag(cls.__name__)] for cls in RESPONSE_FORMATS.values())],  # type: ignore  # noqa: UP007
    Discriminator(_format_tag, custom_error_type="invalid_response_format",
                  custom_error_message=f"type must be one of {', '.join(RESPONSE_FORMATS)}"),
]


# ---- tools ----------------------------------------------------------------------------------------------


class FunctionDefinition(_Body):
    name: ToolName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="the JSON schema of the arguments (an object; one the engine cannot compile: 400); "
                                  "omitted: no arguments")
    strict: StrictBool | None = Field(default=None, description="accepted and changes nothing: the arguments always "
                                                                "match the schema")


class FunctionTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Body):
    name: ToolName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
TOOL_CHOICE_DESCRIPTION = ("none: text only; auto (the default with tools): text, or text then calls; required: "
                           "one call or more; a named function: calls of it alone. Every call is a declared "
                           "function with arguments that match its schema")


# ---- requests --------------------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    """Fields that become `SamplingParams` (None = the engine's default); the ranges are SamplingParams'."""

    max_tokens: PositiveInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=FLOAT32_MAX)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: TopK | None = Field(default=None, description="0 or -1: off")
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=FLOAT32_MAX, description="1: off")] | None = None
    seed: Seed | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: StrictBool | None = None
    min_tokens: NonNegInt | None = None
    skip_special_tokens: StrictBool | None = None
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                               Annotated[Number, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = Field(
        default=None, description="token id (as a string) -> bias added to its logit, -100 (never) .. 100")
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object: the output is a JSON object; json_schema: JSON that matches "
                                  "json_schema.schema (written as `json.dumps` writes it)")
    kv_policy: Annotated[StrictStr, Field(pattern=KV_POLICY_PATTERN)] | None = Field(
        default=None, description="kvmini extension: sink + window eviction, 'sink_window:S:W' keeps the first S "
                                  "and the last W tokens' K/V (':streaming' for StreamingLLM's positions), so "
                                  "max_tokens may exceed the KV cache; default: the server's --kv-policy")
    speculative: StrictBool | None = Field(
        default=None, description="kvmini extension: false = no speculative decoding for this request when the "
                                  "server runs --speculative (its tokens are the same either way)")


class CompletionRequest(SamplingFields):
    # max_tokens 0 needs echo: true (the handler checks it)
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
        "then": {"required": ["echo"], "properties": {"echo": {"const": True}}},
    })

    model: StrictStr | None = None
    # A string, a list of token ids, or (as OpenAI allows) a list of either: one completion per prompt.
    prompt: (NonEmptyStr | TokenIds | Annotated[list[NonEmptyStr], Field(min_length=1)]
             | Annotated[list[TokenIds], Field(min_length=1)]) = Field(
        description="a string, token ids, or a list of either (choice index = prompt index * n + choice)")
    max_tokens: NonNegInt | None = Field(default=None, description="0 only with echo: the prompt alone is returned")
    echo: StrictBool = Field(default=False, description="return the prompt before the completion (with its "
                                                        "logprobs, when logprobs is set; the first token's is null)")
    n: PositiveInt = 1
    logprobs: Logprobs | None = None  # top-n alternatives per token (OpenAI: 0..5; here up to 20)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class ChatCompletionRequest(SamplingFields):
    # top_logprobs (not null) needs logprobs: true (the handler checks it)
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    })

    model: StrictStr | None = None
    messages: Messages
    max_completion_tokens: PositiveInt | None = None
    n: PositiveInt = 1
    logprobs: StrictBool = False
    top_logprobs: Logprobs | None = Field(default=None, description="needs logprobs=true")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None, description="functions the model may call (names unique)")
    tool_choice: ToolChoice | None = Field(default=None, description=TOOL_CHOICE_DESCRIPTION)
    parallel_tool_calls: StrictBool | None = Field(default=None, description="false: at most one call (default true)")
    # Fields clients send by default, accepted where they ask for nothing kvmini does not do; refused (400
    # naming the field) where they do: stored completions.
    store: Literal[False] | None = Field(default=None, description="completions are never stored")
    metadata: Annotated[dict[str, Annotated[StrictStr, Field(max_length=512)]], Field(max_length=16)] | None = None


MAX_SPANS = 64


class SpanRequest(_Body):
    """A named part of the prompt: token positions `start`..`end` (end exclusive), or character offsets
    `start_char`..`end_char` into a string `prompt`."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    start: NonNegInt | None = None
    end: PositiveInt | None = None
    start_char: NonNegInt | None = None
    end_char: PositiveInt | None = None


class AttentionRequest(_Body):
    layers: Annotated[list[NonNegInt], Field(min_length=1, json_schema_extra={"uniqueItems": True})] | None = Field(
        default=None, description="layer indices, no duplicates; omit for every layer")
    heads: Annotated[list[NonNegInt], Field(min_length=1, json_schema_extra={"uniqueItems": True})] | None = Field(
        default=None, description="query head indices, no duplicates; omit for every head (with spans alone: "
                                  "the heads' average)")
    top_k: PositiveInt | None = Field(default=None, description="keep the top_k keys per row; omit for full rows")
    spans: Annotated[list[SpanRequest], Field(min_length=1, max_length=MAX_SPANS)] | None = Field(
        default=None, description="attention mass on these prompt spans, the generated tokens and the rest of "
                                  "the prompt, per token and captured layer")
    rows: StrictBool | None = Field(default=None, description="stream full rows (default: unless top_k or spans)")
    head_stats: StrictBool = Field(default=True, description="every captured head's pattern scores and labels "
                                                             "on the final event")
    head_stats_every: PositiveInt | None = Field(default=None, description="also on every n-th token's event: the "
                                                                           "heads' scores and labels so far")
    prefill_matrix: StrictBool = Field(default=False, description="the prompt's whole attention matrix, on the "
                                                                 "first token's event")
    scores: StrictBool = Field(default=False, description="also the pre-softmax scores q.k/sqrt(d) of full rows")
    value_norms: StrictBool = Field(default=False, description="also ||p_j v_j W_O|| per key of full rows")


def _one_of(*names: str) -> dict:
    """JSON schema: exactly one of these fields is given and not null (the handler checks it)."""
    return {"oneOf": [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]}


class GenerateRequest(SamplingFields):
    """Give exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(json_schema_extra=_one_of("prompt", "messages"))

    model: StrictStr | None = None
    prompt: NonEmptyStr | TokenIds | None = None
    messages: Messages | None = None
    logprobs: Logprobs | None = None
    stream: StrictBool = True
    format: Literal["sse", "ndjson"] = "sse"
    attention: AttentionRequest | None = None


class TokenizeRequest(_Body):
    """Give exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(json_schema_extra=_one_of("prompt", "messages"))

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Messages | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None, description="with messages: the prompt shows these tools, as chat completions' does")
    add_special_tokens: StrictBool = True
    return_token_texts: StrictBool = Field(default=False, description="also each token's text, decoded on its own "
                                                                      "(special tokens included)")


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[TokenId]
    skip_special_tokens: StrictBool = False
