"""The body of POST /v1/responses (OpenAI's Responses API, the stateless part): input items, function tools,
text formats. Types are strict and unknown fields refused, as in server/protocol.py; input items also take
the keys a client copies from an earlier response's output (`id`, `status`, `annotations`, ...), which
change nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictStr, Tag

from engine.text.tool_calls import MAX_TOOLS
from server.protocol import FLOAT32_MAX, JsonSchemaSpec, Number, PositiveInt, ToolName, _Body


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContent(_Item):
    type: Literal["input_text", "output_text"]
    text: StrictStr


ItemContent = StrictStr | Annotated[list[TextContent], Field(min_length=1)]


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: ItemContent


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: Annotated[StrictStr, Field(min_length=1)]
    name: ToolName
    arguments: StrictStr = Field(description="JSON text of an object")


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: Annotated[StrictStr, Field(min_length=1)]
    output: ItemContent


ITEM_CLASSES = {"message": MessageItem, "function_call": FunctionCallItem,
                "function_call_output": FunctionCallOutputItem}


def _item_tag(value: Any) -> str | None:
    """The item class by `type` (absent: a message, as OpenAI's EasyInputMessage); None for another type."""
    if isinstance(value, BaseModel):
        return type(value).__name__
    if not isinstance(value, dict):
        return MessageItem.__name__
    cls = ITEM_CLASSES.get(value.get("type", "message")) if isinstance(value.get("type", "message"), str) else None
    return cls.__name__ if cls is not None else None


InputItem = Annotated[
    Union[tuple(Annotated[cls, Tag(cls.__name__)] for cls in ITEM_CLASSES.values())],  # type: ignore[misc]  # noqa: UP007
    Discriminator(_item_tag, custom_error_type="invalid_item_type",
                  custom_error_message=f"type must be one of {', '.join(ITEM_CLASSES)}"),
]


class ResponseFunctionTool(_Body):
    type: Literal["function"]
    name: ToolName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="the JSON schema of the arguments (an "
                                                                       "object); omitted: no arguments")
    strict: StrictBool | None = Field(default=None, description="accepted and changes nothing: the arguments always "
                                                                "match the schema")


class ResponseNamedToolChoice(_Body):
    type: Literal["function"]
    name: ToolName


class TextFormatText(_Body):
    type: Literal["text"]


class TextFormatJsonObject(_Body):
    type: Literal["json_object"]


class TextFormatJsonSchema(JsonSchemaSpec):
    type: Literal["json_schema"]


class TextConfig(_Body):
    format: TextFormatText | TextFormatJsonObject | TextFormatJsonSchema | None = Field(
        default=None, description="json_schema: the reply is JSON that matches `schema`")
    verbosity: Literal["medium"] | None = Field(default=None, description="only the default")


class ResponsesRequest(_Body):
    model: StrictStr | None = None
    input: Annotated[StrictStr, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description="a user message's text, or input items: messages, function calls and their outputs")
    instructions: StrictStr | None = Field(default=None, description="a system message put first")
    max_output_tokens: PositiveInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=FLOAT32_MAX)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    tools: Annotated[list[ResponseFunctionTool], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None, description="function tools only (names unique)")
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    stream: StrictBool = False
    store: StrictBool | None = Field(default=None, description="responses are never stored: false or omitted "
                                                                "(true: 400)")
    previous_response_id: StrictStr | None = Field(default=None, description="responses are not stored (a value: "
                                                                             "400): send the conversation as input")
    include: Annotated[list[StrictStr], Field(max_length=0)] | None = Field(
        default=None, description="nothing extra can be included: an empty list or omitted")
    truncation: Literal["disabled"] | None = None
    metadata: Annotated[dict[str, Annotated[StrictStr, Field(max_length=512)]], Field(max_length=16)] | None = None
    user: StrictStr | None = None
