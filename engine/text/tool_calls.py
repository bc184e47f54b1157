"""Tool calls: function tools as a grammar the output follows, the prompt that describes them, and the parser
that reads the calls back out of the text, whole or as it streams.

The call syntax is Hermes's (NousResearch's Hermes 2 Pro, Qwen2.5, SmolLM3; vLLM's `hermes` parser), one block
per call, blocks separated by a newline:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The JSON is written as `json.dumps` writes it (engine/text/structured.py `JSON_LAYOUT`). `tool_call_grammar`
compiles that into a Lark grammar for llguidance:

* "required" and a named function: the output is one call or more (one, without parallel calls), each of a
  declared function whose arguments match its schema, then EOS: every call parses and validates.
* "auto": free text, or free text and then calls. The text before the first `<tool_call>` is a lazy lexeme
  (llguidance ends it at the first match), so the moment the model writes the tag the call grammar takes
  over: a call is always complete and valid, or absent. This is llguidance's "struct tag" pattern
  (docs/syntax.md, tool calling), the lazy-grammar idea of llama.cpp's server.

How the tools reach the model (`tool_chat_inputs`): a chat template that takes `tools` (as HF's
`apply_chat_template(tools=...)` passes them: Qwen2.5, Hermes, SmolLM3, Llama 3.1) gets them, with the
assistant's calls as `tool_calls` whose arguments are objects. Any other template (the default model's) gets
`DEFAULT_TOOL_PREAMBLE` in its system message, assistant calls written out as blocks above and tool results
as a user message of `<tool_response>` blocks, as Qwen2.5's template writes them.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.core.errors import RequestError
from engine.text.structured import JSON_LAYOUT, StructuredOutput, check_schema_depth

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit per request
MAX_TOOL_SCHEMA_BYTES = 64 << 10  # of one tool's parameters, as compact JSON

DEFAULT_TOOL_PREAMBLE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

ToolChoiceMode = Literal["none", "auto", "required"]


@dataclass(frozen=True)
class Tool:
    """One function the model may call: `parameters` is the JSON schema of its arguments (an object)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    description: str | None = None

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's chat-completions definition, what chat templates and the preamble show the model."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def check_tools(tools: Sequence[Tool], param: str = "tools") -> None:
    """Names that OpenAI allows and no two alike; parameters a JSON object schema of bounded size and depth.
    RequestError names the field: `tools[1].name`, `tools[0].parameters`."""
    if len(tools) > MAX_TOOLS:
        raise RequestError(param, f"at most {MAX_TOOLS} tools, got {len(tools)}")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool.name, str) or TOOL_NAME_PATTERN.fullmatch(tool.name) is None:
            raise RequestError(f"{where}.name", f"{where}.name must be 1-64 letters, digits, '_' or '-', "
                                                f"got {tool.name!r}")
        if tool.name in seen:
            raise RequestError(f"{where}.name", f"{where}.name {tool.name!r} is already the name of "
                                                f"{param}[{seen[tool.name]}]; tool names must be unique")
        seen[tool.name] = i
        check_parameters(tool.parameters, f"{where}.parameters")


def check_parameters(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise RequestError(param, f"{param} must be a JSON schema object, got {type(schema).__name__}")
    kind = schema.get("type", "object")
    if kind != "object":
        raise RequestError(param, f"{param} must describe an object (the call's arguments), got type {kind!r}")
    check_schema_depth(schema, param)
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise RequestError(param, f"{param} is not JSON: {e}") from None
    if size > MAX_TOOL_SCHEMA_BYTES:
        raise RequestError(param, f"{param} is {size:,} bytes of JSON; the limit is {MAX_TOOL_SCHEMA_BYTES:,}")


def arguments_schema(tool: Tool) -> StructuredOutput:
    """The tool's arguments alone as a structured output: compiling it finds a schema llguidance refuses,
    and names that one tool."""
    return StructuredOutput(json=call_schema(tool)["properties"]["arguments"])


def call_schema(tool: Tool) -> dict[str, Any]:
    """The JSON schema of one call's object: `{"name": <this name>, "arguments": <its parameters>}`."""
    arguments = dict(tool.parameters)
    arguments.setdefault("type", "object")
    schema: dict[str, Any] = {"type": "object", "properties": {"name": {"const": tool.name}}}
    # "#/$defs/..." references inside the parameters resolve from the document's root: move the definitions there.
    for key in ("$defs", "definitions"):
        if key in arguments:
            schema[key] = arguments.pop(key)
    schema["properties"]["arguments"] = arguments
    schema.update(required=["name", "arguments"], additionalProperties=False)
    schema["x-guidance"] = JSON_LAYOUT
    return schema


def tool_call_grammar(tools: Sequence[Tool], mode: ToolChoiceMode, *, function: str | None = None,
                      parallel: bool = True) -> StructuredOutput:
    """The grammar of a reply under tool_choice `mode` ("auto" or "required"), or of calls of `function` alone
    (OpenAI's named tool_choice). `parallel`: more than one call may follow another."""
    if mode not in ("auto", "required"):
        raise ValueError(f"no grammar for tool_choice {mode!r}")
    chosen = [t for t in tools if function is None or t.name == function]
    if not chosen:
        raise ValueError(f"no declared tool is named {function!r}")
    calls = " | ".join(f"call_{i}" for i in range(len(chosen)))
    lines = ["%llguidance {}"]
    repeat = f' ("\\n{TOOL_CALL_OPEN}" call)*' if parallel else ""
    if mode == "auto" and function is None:
        lines += [f"start: TEXT | head call{repeat}", f'head[lazy]: TEXT "{TOOL_CALL_OPEN}"', r"TEXT: /(.|\n)*/"]
    else:
        lines += [f'start: "{TOOL_CALL_OPEN}" call{repeat}']
    lines.append(f'call: "\\n" ({calls}) "\\n{TOOL_CALL_CLOSE}"')
    lines += [f"call_{i}: %json {json.dumps(call_schema(t))}" for i, t in enumerate(chosen)]
    return StructuredOutput(grammar="\n".join(lines) + "\n")


# ---- the prompt -----------------------------------------------------------------------------------------


def template_takes_tools(chat_templates: Mapping[str, str]) -> bool:
    """Whether the checkpoint's chat template renders `tools` itself (a "tool_use" template, or a default
    one that reads the variable)."""
    if "tool_use" in chat_templates:
        return True
    template = chat_templates.get("default")
    return template is not None and re.search(r"\btools\b", template) is not None


def tool_chat_inputs(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool], *,
                     template_has_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and template keyword arguments that show `tools` (may be empty) and the conversation's
    earlier calls and results to the model (module docstring). Messages are OpenAI's chat messages."""
    if template_has_tools:
        return [_with_object_arguments(m) for m in messages], ({"tools": [t.as_openai() for t in tools]}
                                                                if tools else {})
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") == "tool":
            block = f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        elif m.get("role") == "assistant" and m.get("tool_calls"):
            blocks = [format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            content = _text(m.get("content"))
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_responses", None)
    if tools:
        preamble = DEFAULT_TOOL_PREAMBLE.format(tools="\n".join(json.dumps(t.as_openai()) for t in tools))
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out, {}


def format_call(name: str, arguments: str | Mapping[str, Any]) -> str:
    """One call as its block, arguments as JSON text or as an object."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n{TOOL_CALL_CLOSE}'


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _with_object_arguments(m: Mapping[str, Any]) -> dict[str, Any]:
    """HF templates write `tool_call.arguments | tojson`: they expect an object, OpenAI sends a JSON string."""
    m = dict(m)
    if m.get("tool_calls"):
        calls = []
        for c in m["tool_calls"]:
            function = dict(c["function"])
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # checked by check_tool_messages; a template shows the text as it is
            calls.append({**c, "function": function})
        m["tool_calls"] = calls
    return m


def check_tool_messages(messages: Sequence[Mapping[str, Any]], param: str = "messages") -> None:
    """Assistant calls name a function and carry JSON-object arguments; every tool message answers a call made
    before it (its `tool_call_id`). RequestError names the field, e.g. `messages[3].tool_call_id`."""
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if m.get("role") == "assistant":
            for j, call in enumerate(m.get("tool_calls") or []):
                if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
                    raise RequestError(f"{where}.tool_calls[{j}]", "a tool call is an object with an id and a "
                                                                   "function {name, arguments}")
                call_ids.add(call.get("id"))
                arguments = call["function"].get("arguments")
                try:
                    value = json.loads(arguments) if isinstance(arguments, str) else arguments
                except json.JSONDecodeError as e:
                    raise RequestError(f"{where}.tool_calls[{j}].function.arguments",
                                       f"the arguments are not JSON: {e}") from None
                if not isinstance(value, dict):
                    raise RequestError(f"{where}.tool_calls[{j}].function.arguments",
                                       "the arguments must be a JSON object")
        elif m.get("role") == "tool":
            tool_call_id = m.get("tool_call_id")
            if tool_call_id not in call_ids:
                known = ", ".join(sorted(call_ids)) or "none"
                raise RequestError(f"{where}.tool_call_id",
                                   f"{where}.tool_call_id {tool_call_id!r} answers no call made before it "
                                   f"(the assistant's calls so far: {known})")


# ---- reading calls back -------------------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One call as the model wrote it: `arguments` is its JSON text (complete once `done`)."""

    index: int
    id: str
    name: str
    arguments: str = ""
    done: bool = False


@dataclass
class TextDelta:
    text: str


@dataclass
class CallStarted:
    call: ToolCall


@dataclass
class ArgumentsDelta:
    call: ToolCall
    text: str


@dataclass
class CallDone:
    call: ToolCall


ToolEvent = TextDelta | CallStarted | ArgumentsDelta | CallDone

_CALL_HEAD = re.compile(r'\n\{"name": "([^"\\]*)", "arguments": ')
_CALL_TAIL = "}\n" + TOOL_CALL_CLOSE


class ToolCallParser:
    """Reads a reply that follows `tool_call_grammar`, as text deltas arrive: the text before the first call,
    then each call's name and its arguments piece by piece. Text that may still turn out to be a call's tag
    (a trailing "<tool_") is held back until the next delta or `finish`. Give the whole reply at once to read
    a finished one; `calls` then holds every complete call."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""  # the text before the first call
        self._buffer = ""
        self._state: Literal["text", "head", "arguments", "tail", "between"] = "text"
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while self._buffer:
            before = (self._state, len(self._buffer))
            getattr(self, f"_read_{self._state}")(events)
            if (self._state, len(self._buffer)) == before:
                break  # waits for more text
        return events

    def finish(self) -> list[ToolEvent]:
        """The reply has ended: the text held back goes out (as content, before any call); an unfinished call
        stays in `calls` with `done` False (the reply hit its token limit)."""
        events: list[ToolEvent] = []
        if self._state == "text" and self._buffer:
            events.append(self._content(self._buffer))
        self._buffer = ""
        return events

    @property
    def complete_calls(self) -> list[ToolCall]:
        return [c for c in self.calls if c.done]

    def _content(self, text: str) -> TextDelta:
        self.content += text
        return TextDelta(text)

    def _read_text(self, events: list[ToolEvent]) -> None:
        at = self._buffer.find(TOOL_CALL_OPEN)
        if at >= 0:
            text = self._buffer[:at].rstrip()  # the newline before a call is layout, not content
            if text:
                events.append(self._content(text))
            self._buffer = self._buffer[at + len(TOOL_CALL_OPEN):]
            self._state = "head"
            return
        keep = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
        body = self._buffer[: len(self._buffer) - keep]
        shown = body.rstrip()  # trailing whitespace waits: it is dropped if a call follows
        if shown:
            events.append(self._content(shown))
            self._buffer = self._buffer[len(shown):]

    def _read_head(self, events: list[ToolEvent]) -> None:
        m = _CALL_HEAD.match(self._buffer)
        if m is None:
            return
        call = ToolCall(index=len(self.calls), id=new_call_id(), name=m[1])
        self.calls.append(call)
        events.append(CallStarted(call))
        self._buffer = self._buffer[m.end():]
        self._state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False

    def _read_arguments(self, events: list[ToolEvent]) -> None:
        call, end = self.calls[-1], None
        for i, ch in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        piece = self._buffer if end is None else self._buffer[:end]
        call.arguments += piece
        events.append(ArgumentsDelta(call, piece))
        self._buffer = self._buffer[len(piece):]
        if end is not None:
            self._state = "tail"

    def _read_tail(self, events: list[ToolEvent]) -> None:
        if len(self._buffer) < len(_CALL_TAIL):
            return
        call = self.calls[-1]
        call.done = True
        events.append(CallDone(call))
        self._buffer = self._buffer[len(_CALL_TAIL):]
        self._state = "between"

    def _read_between(self, events: list[ToolEvent]) -> None:
        sep = "\n" + TOOL_CALL_OPEN
        if self._buffer.startswith(sep):
            self._buffer = self._buffer[len(sep):]
            self._state = "head"
        elif not sep.startswith(self._buffer):
            self._buffer = ""  # nothing else follows a call under the grammar (EOS text, if shown)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_calls(text: str) -> ToolCallParser:
    """A finished reply read at once: `.content` and `.calls`."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    return parser
