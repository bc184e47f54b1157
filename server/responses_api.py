"""POST /v1/responses: OpenAI's Responses API, stateless. Input items become a chat conversation (function calls
an assistant's `tool_calls`, their outputs tool messages), the reply becomes output items (a message, then
function calls), and a stream sends OpenAI's typed events:

    response.created, response.in_progress,
    per item: response.output_item.added, then for a message response.content_part.added,
    response.output_text.delta..., response.output_text.done, response.content_part.done, and for a call
    response.function_call_arguments.delta..., response.function_call_arguments.done;
    response.output_item.done,
    and last response.completed (response.incomplete at max_output_tokens, response.failed on an engine error).

Nothing is stored: `store: true` and `previous_response_id` are 400s; send the whole conversation each time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from engine.core.errors import RequestError
from engine.core.outputs import RequestOutput
from engine.text.structured import StructuredOutput
from engine.text.tool_calls import ArgumentsDelta, CallDone, CallStarted, TextDelta, ToolCallParser
from server.engine_loop import EngineStepError, Submission
from server.errors import APIError
from server.params import chat_prompt_ids, check_model, max_tokens_for, request_errors, submissions
from server.protocol import Messages, SamplingFields, UserMessage
from server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponseNamedToolChoice,
    ResponsesRequest,
    TextFormatJsonObject,
    TextFormatJsonSchema,
)
from server.state import ServerState, server_state
from server.streaming import SSE_KEEPALIVE, collect, dumps, outputs, stream_response
from server.tools import RESPONSES_FIELDS, ToolRequest, engine_tool, tool_request

router = APIRouter()


# ---- the request ----------------------------------------------------------------------------------------


def conversation(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The input as chat messages (instructions first, as a system message). A function_call_output must
    answer a function_call before it: a 400 naming `input[i].call_id` otherwise."""
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return messages + [UserMessage(role="user", content=body.input).template_dict()]
    call_ids: set[str] = set()
    for i, item in enumerate(body.input):
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            call_ids.add(item.call_id)
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in call_ids:
                raise APIError(400, f"input[{i}].call_id {item.call_id!r} answers no function_call before it",
                               param=f"input[{i}].call_id")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return messages


def _text(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _tool_request(state: ServerState, body: ResponsesRequest) -> ToolRequest:
    tools = [engine_tool(t.name, t.parameters, t.description) for t in body.tools or []]
    named = body.tool_choice.name if isinstance(body.tool_choice, ResponseNamedToolChoice) else None
    choice = None if named is not None else body.tool_choice
    return tool_request(state.llm, tools, choice, named, body.parallel_tool_calls, RESPONSES_FIELDS)


def _text_format(state: ServerState, body: ResponsesRequest) -> StructuredOutput | None:
    fmt = body.text.format if body.text is not None else None
    if not isinstance(fmt, (TextFormatJsonObject, TextFormatJsonSchema)):
        return None
    param = "text.format.schema" if isinstance(fmt, TextFormatJsonSchema) else "text.format"
    try:
        spec = (StructuredOutput(json_object=True) if isinstance(fmt, TextFormatJsonObject)
                else StructuredOutput(json=fmt.schema_))
        state.llm.engine.grammars.compile(spec)
    except RequestError as e:
        raise APIError(400, e.message, param=param, code=e.code) from None
    return spec


@dataclass
class ResponseInputs:
    ids: list[int]
    subs: list[Submission]
    tools: ToolRequest


def _inputs(state: ServerState, body: ResponsesRequest) -> ResponseInputs:
    check_model(body.model, state.model_name)
    if body.store:
        raise APIError(400, "responses are not stored: send store: false (or leave it out)", param="store")
    if body.previous_response_id is not None:
        raise APIError(400, "responses are not stored, so previous_response_id cannot be looked up: send the whole "
                            "conversation as input items", param="previous_response_id")
    tools = _tool_request(state, body)
    text_format = _text_format(state, body)
    if tools.active and text_format is not None:
        raise APIError(400, "text.format cannot be combined with tool calls: send tool_choice \"none\" for a "
                            "structured reply, or drop text.format", param="text.format")
    messages = conversation(body)
    with request_errors({"messages": "input"}):
        ids = chat_prompt_ids(state.llm, _as_chat(messages), "input", tools=tools.shown)
    fields = SamplingFields(temperature=body.temperature, top_p=body.top_p)
    max_tokens = max_tokens_for(state.llm, len(ids), body.max_output_tokens, prompt_param="input",
                                max_tokens_param="max_output_tokens", body=fields)
    renames = {"max_tokens": "max_output_tokens", "prompt": "input"}
    subs = submissions(state.llm, state.settings, fields, ids, n=1, max_tokens=max_tokens, logprobs=None,
                       renames=renames, grammar=tools.grammar or text_format)
    return ResponseInputs(ids, subs, tools)


_MESSAGES = TypeAdapter(Messages)


def _as_chat(messages: list[dict[str, Any]]) -> list:
    """Chat messages as the chat route's message models (what `chat_prompt_ids` reads)."""
    with request_errors({"messages": "input"}):
        try:
            return _MESSAGES.validate_python(messages)
        except ValueError as e:  # an item the chat rules refuse (e.g. text with a lone surrogate)
            raise RequestError("input", f"invalid input: {e}") from None


# ---- the response ---------------------------------------------------------------------------------------


@dataclass
class ResponseBuilder:
    """One response's output items as the reply streams in: a message item for text, one function_call item
    per call; `events` are the stream's typed events for each piece."""

    id: str
    created_at: int
    model: str
    body: ResponsesRequest
    tools: ToolRequest
    num_prompt: int
    parser: ToolCallParser = field(default_factory=ToolCallParser)
    output: list[dict[str, Any]] = field(default_factory=list)
    text_item: dict[str, Any] | None = None
    call_items: dict[int, dict[str, Any]] = field(default_factory=dict)
    num_output: int = 0
    cached: int = 0
    finish_reason: str | None = None
    error: str | None = None
    sequence: int = 0

    def event(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {dumps(payload)}\n\n"

    def add(self, out: RequestOutput) -> list[str]:
        self.num_output, self.cached = out.num_output_tokens, out.num_cached_prompt_tokens
        if self.tools.active:
            pieces = self.parser.feed(out.new_text) + (self.parser.finish() if out.finished else [])
        else:
            pieces = [TextDelta(out.new_text)] if out.new_text else []
        events = [e for piece in pieces for e in self._piece(piece)]
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error
            events += self._close_items()
        return events

    def _piece(self, piece) -> list[str]:
        if isinstance(piece, TextDelta):
            events = self._open_text() if self.text_item is None else []
            part = self.text_item["content"][0]
            part["text"] += piece.text
            return events + [self.event("response.output_text.delta", item_id=self.text_item["id"],
                                        output_index=self._index(self.text_item), content_index=0,
                                        delta=piece.text, logprobs=[])]
        if isinstance(piece, CallStarted):
            events = self._close_text()
            item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                    "call_id": piece.call.id, "name": piece.call.name, "arguments": ""}
            self.call_items[piece.call.index] = item
            self.output.append(item)
            return events + [self.event("response.output_item.added", output_index=self._index(item), item=item)]
        if isinstance(piece, ArgumentsDelta):
            item = self.call_items[piece.call.index]
            item["arguments"] += piece.text
            return [self.event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=self._index(item), delta=piece.text)] if piece.text else []
        if isinstance(piece, CallDone):
            item = self.call_items[piece.call.index]
            item["status"] = "completed"
            return [self.event("response.function_call_arguments.done", item_id=item["id"],
                               output_index=self._index(item), name=item["name"], arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=self._index(item), item=item)]
        return []

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, x in enumerate(self.output) if x is item)

    def _open_text(self) -> list[str]:
        self.text_item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress",
                          "role": "assistant", "content": []}
        self.output.append(self.text_item)
        index = self._index(self.text_item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.text_item["content"].append(part)
        return [self.event("response.output_item.added", output_index=index,
                           item={**self.text_item, "content": []}),
                self.event("response.content_part.added", item_id=self.text_item["id"], output_index=index,
                           content_index=0, part=dict(part))]

    def _close_text(self) -> list[str]:
        item = self.text_item
        if item is None or item["status"] == "completed":
            return []
        item["status"] = "completed"
        index, part = self._index(item), item["content"][0]
        return [self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=part["text"], logprobs=[]),
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=index, item=item)]

    def _close_items(self) -> list[str]:
        events = self._close_text()
        if self.tools.active:  # a call the token limit cut short never reaches the client
            cut = [item for item in self.call_items.values() if item["status"] != "completed"]
            for item in cut:
                item["status"] = "incomplete"
            if cut:
                events += [self.event("response.output_item.done", output_index=self._index(i), item=i) for i in cut]
                self.output = [item for item in self.output if item["status"] != "incomplete"]
        return events

    @property
    def status(self) -> str:
        if self.finish_reason is None:
            return "in_progress"
        return {"length": "incomplete", "error": "failed"}.get(self.finish_reason, "completed")

    def response(self) -> dict[str, Any]:
        """The response object (OpenAI's `Response`) as it stands."""
        body = self.body
        status = self.status
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, ResponseNamedToolChoice) else (
            body.tool_choice or "auto")
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else {
            "type": "text"}
        done = status != "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": {"code": "server_error", "message": self.error or "the engine failed"} if status == "failed"
            else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": self.output if done else [], "parallel_tool_calls": self.tools.parallel,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": fmt, "verbosity": "medium"}, "tool_choice": choice, "tools": tools,
            "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled",
            "usage": self.usage() if done else None, "user": body.user, "metadata": body.metadata or {},
        }

    def usage(self) -> dict[str, Any]:
        return {"input_tokens": self.num_prompt, "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": self.num_output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.num_prompt + self.num_output}


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    state = server_state(request)
    arrival = time.monotonic()
    inputs = await run_in_threadpool(_inputs, state, body)
    with request_errors({"max_tokens": "max_output_tokens", "prompt": "input"}):
        group = await state.loop().submit(inputs.subs, arrival)
    builder = ResponseBuilder(f"resp_{uuid.uuid4().hex}", int(time.time()), state.model_name, body, inputs.tools,
                              len(inputs.ids))
    if not body.stream:
        await collect(group, request, lambda i, out: builder.add(out))
        return builder.response()
    return stream_response(_events(builder, group, state.settings.sse_keepalive_s), group)


FINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}


async def _events(builder: ResponseBuilder, group, keepalive_s: float) -> AsyncIterator[str]:
    try:
        yield builder.event("response.created", response=builder.response())
        yield builder.event("response.in_progress", response=builder.response())
        async for item in outputs(group, keepalive_s):
            if item is None:
                yield SSE_KEEPALIVE
                continue
            for event in builder.add(item[1]):
                yield event
    except EngineStepError as e:
        builder.finish_reason, builder.error = "error", str(e)
    finally:
        group.close()
    yield builder.event(FINAL_EVENTS[builder.status if builder.finish_reason else "failed"],
                        response=builder.response())

