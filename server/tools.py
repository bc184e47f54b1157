"""From a request's tools to the engine's: the declared functions, the tool choice and its grammar, compiled (a
400 naming the field when it cannot be). The prompt that shows them: server/params.py `chat_prompt_ids`.

Chat completions and the Responses API spell the same things differently (`tools[0].function.name` against
`tools[0].name`); `ToolFields` says where each lives, so one set of rules names the field the client wrote.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.api.llm import LLM
from engine.core.errors import RequestError
from engine.text.structured import StructuredOutput
from engine.text.tool_calls import (
    Tool,
    ToolCallParser,
    ToolChoiceMode,
    arguments_schema,
    check_tools,
    tool_call_grammar,
)
from server.errors import APIError
from server.params import api_error
from server.protocol import FunctionTool


@dataclass(frozen=True)
class ToolFields:
    """Where a route keeps a tool's parts: `{}` is the tool's index."""

    tool: str  # "tools[{}].function" (chat) or "tools[{}]" (responses)
    choice_name: str  # "tool_choice.function.name" or "tool_choice.name"


CHAT_FIELDS = ToolFields("tools[{}].function", "tool_choice.function.name")
RESPONSES_FIELDS = ToolFields("tools[{}]", "tool_choice.name")


@dataclass
class ToolRequest:
    """What a request asks of tools. `grammar` is None when the reply is plain text (no tools, or "none")."""

    tools: list[Tool]
    mode: ToolChoiceMode
    function: str | None  # a named tool_choice
    parallel: bool
    grammar: StructuredOutput | None

    @property
    def active(self) -> bool:
        return self.grammar is not None

    @property
    def shown(self) -> list[Tool]:
        """The tools the prompt describes: none under tool_choice "none" (the reply is text)."""
        return self.tools if self.mode != "none" else []

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser() if self.active else None


NO_TOOLS = ToolRequest([], "none", None, True, None)


def engine_tool(name: str, parameters: dict[str, Any] | None, description: str | None) -> Tool:
    """One declared function as the engine's `Tool` (no parameters: an object of none)."""
    return Tool(name, parameters if parameters is not None else {"type": "object", "properties": {}}, description)


def chat_tools(tools: Sequence[FunctionTool] | None) -> list[Tool]:
    """Chat completions' tool definitions (`{"type": "function", "function": {...}}`) as the engine's."""
    return [engine_tool(t.function.name, t.function.parameters, t.function.description) for t in tools or []]


def tool_request(llm: LLM, tools: Sequence[Tool], choice: str | None, function: str | None,
                 parallel: bool | None, fields: ToolFields) -> ToolRequest:
    """Check the tools and the choice and compile their grammar (here, in the request's worker thread; the
    engine thread finds it cached). `choice` is "none" / "auto" / "required" or None (the default: "auto"
    with tools), `function` a named choice's function."""
    tools = list(tools)
    _check(check_tools, tools, fields=fields)
    if function is not None:
        if function not in {t.name for t in tools}:
            declared = ", ".join(t.name for t in tools) or "none"
            raise APIError(400, f"{fields.choice_name} {function!r} names no declared tool (declared: {declared})",
                           param=fields.choice_name)
        mode: ToolChoiceMode = "required"
    else:
        mode = choice or "auto"
    if not tools:  # "auto" without tools is what some clients send by default: plain text
        if mode == "required":
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        mode = "none"
    parallel = True if parallel is None else parallel
    for i, tool in enumerate(tools):  # each schema on its own first (also under "none"): an error names its tool
        _compile(llm, arguments_schema(tool), fields.tool.format(i) + ".parameters")
    if mode == "none":
        return ToolRequest(tools, mode, None, parallel, None)
    grammar = tool_call_grammar(tools, mode, function=function, parallel=parallel)
    _compile(llm, grammar, "tools")
    return ToolRequest(tools, mode, function, parallel, grammar)


def _compile(llm: LLM, spec: StructuredOutput, param: str) -> None:
    try:
        llm.engine.grammars.compile(spec)
    except RequestError as e:
        raise APIError(400, f"{param}: {e.message}", param=param, code=e.code) from None


def _check(check, *args, fields: ToolFields) -> None:
    """Run an engine check whose errors say `tools[i].name` / `tools[i].parameters`, naming the route's field."""
    try:
        check(*args)
    except RequestError as e:
        param = e.param or "tools"
        m = re.match(r"tools\[(\d+)\]", param)
        if m is not None:
            renamed = fields.tool.format(m[1]) + param[m.end():]
            raise APIError(400, e.message.replace(param, renamed), param=renamed, code=e.code) from None
        raise api_error(e) from None


def finish_reason(parser: ToolCallParser | None, engine_reason: str | None) -> str | None:
    """OpenAI's "tool_calls" when the reply ended after complete calls."""
    if parser is not None and engine_reason == "stop" and parser.complete_calls:
        return "tool_calls"
    return engine_reason


def call_json(call) -> dict[str, Any]:
    """One complete call as chat completions' `message.tool_calls` item."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}

