"""Tool calls (engine/text/tool_calls.py, server/tools.py, the chat route's `tools`): the parser that reads calls back,
whole and as it streams; the grammar that makes every call a declared function with schema-valid arguments (checked
token by token with the default model's tokenizer); 50 varied schemas through the default model, every reply
validated with `jsonschema`; bad and hostile definitions over HTTP; and a tool-call round trip on a tiny model."""

from __future__ import annotations

import json
import random
import time
import zlib
from enum import Enum
from typing import Literal, Optional

import httpx
import jsonschema
import pytest
import torch
from live_server import LiveServer
from pydantic import BaseModel, ConfigDict, Field

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams
from engine.core.config import ModelConfig
from engine.core.errors import RequestError
from engine.text.structured import GrammarCompiler, StructuredOutput, bitmask_words
from engine.text.tokenizer import Tokenizer
from engine.text.tool_calls import (
    TOOL_CALL_OPEN,
    ArgumentsDelta,
    CallDone,
    CallStarted,
    TextDelta,
    Tool,
    ToolCallParser,
    check_tool_messages,
    check_tools,
    format_call,
    parse_tool_calls,
    template_takes_tools,
    tool_call_grammar,
    tool_chat_inputs,
)
from server import ServerSettings, create_app


def block(name: str, arguments: str) -> str:
    """One call as the grammar writes it (the arguments as JSON text)."""
    return format_call(name, arguments)


# ---- the parser --------------------------------------------------------------------------------------------

WEATHER = block("get_weather", '{"city": "Paris", "unit": "celsius"}')
ADD = block("add", '{"a": 1, "b": 2}')
TRICKY_ARGS = ('{"q": "a}b{c]", "quote": "say \\"hi\\" {", "slash": "C:\\\\dir\\\\", "nested": '
               '[1, {"x": "]}"}, []], "u": "\\u00e9\\n}"}')
EMPTY_ARGS = block("now", "{}")

REPLIES = {
    "content then calls": ("Let me check that for you.\n" + WEATHER, "Let me check that for you.",
                           [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    "calls only": (WEATHER, "", [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    "two calls": (WEATHER + "\n" + ADD, "", [("get_weather", '{"city": "Paris", "unit": "celsius"}'),
                                             ("add", '{"a": 1, "b": 2}')]),
    "content then two calls": ("Sure.  \n\n" + ADD + "\n" + EMPTY_ARGS, "Sure.", [("add", '{"a": 1, "b": 2}'),
                                                                                  ("now", "{}")]),
    "none": ("Paris is sunny today. a < b, and <tool> is not a tag.",
             "Paris is sunny today. a < b, and <tool> is not a tag.", []),
    "none, trailing whitespace": ("Hello there \n", "Hello there \n", []),
    "braces, quotes, escapes in strings": (block("search", TRICKY_ARGS), "", [("search", TRICKY_ARGS)]),
    "empty arguments": (EMPTY_ARGS, "", [("now", "{}")]),
}


def summary(parser: ToolCallParser) -> tuple:
    return parser.content, [(c.index, c.name, c.arguments, c.done) for c in parser.calls]


def fed(chunks: list[str]) -> tuple[ToolCallParser, list]:
    parser, events = ToolCallParser(), []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return parser, events


def chunkings(text: str, seed: int, n: int = 25):
    """Char by char, then `n` random cuts of `text` (pieces of 1 to 12 characters)."""
    yield list(text)
    rng = random.Random(seed)
    for _ in range(n):
        pieces, i = [], 0
        while i < len(text):
            j = i + rng.randint(1, 12)
            pieces.append(text[i:j])
            i = j
        yield pieces


def check_events(parser: ToolCallParser, events: list) -> None:
    """The events tell the same story as the parser's result: text pieces join into the content; each call starts
    (with its name), gets its arguments piece by piece, and is done, in order."""
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == parser.content
    started, args, done = [], {}, []
    for e in events:
        if isinstance(e, CallStarted):
            assert e.call.index == len(started) and not done[len(started):]
            started.append(e.call.name)
            args[e.call.index] = ""
        elif isinstance(e, ArgumentsDelta):
            assert e.call.index == len(started) - 1 and e.call.index not in done
            args[e.call.index] += e.text
        elif isinstance(e, CallDone):
            assert e.call.index == len(started) - 1
            done.append(e.call.index)
        elif isinstance(e, TextDelta):
            assert not started, "content comes before the first call"
    assert started == [c.name for c in parser.calls]
    assert [args[c.index] for c in parser.calls] == [c.arguments for c in parser.calls]
    assert done == [c.index for c in parser.calls if c.done]


@pytest.mark.parametrize("case", list(REPLIES))
def test_parser_reads_whole_replies(case):
    text, content, calls = REPLIES[case]
    parser = parse_tool_calls(text)
    assert parser.content == content
    assert [(c.name, c.arguments) for c in parser.complete_calls] == calls
    assert all(c.done for c in parser.calls) and [c.index for c in parser.calls] == list(range(len(calls)))
    for c in parser.calls:
        json.loads(c.arguments)
        assert c.id.startswith("call_") and len(c.id) > len("call_")
    assert len({c.id for c in parser.calls}) == len(parser.calls)


@pytest.mark.parametrize("case", list(REPLIES))
def test_streaming_parser_matches_the_whole_reply_however_it_is_cut(case):
    text = REPLIES[case][0]
    want = summary(parse_tool_calls(text))
    for seed, chunks in enumerate(chunkings(text, seed=zlib.crc32(case.encode()))):
        parser, events = fed(chunks)
        assert summary(parser) == want, (seed, chunks)
        check_events(parser, events)


def test_a_partial_tag_is_held_back_until_finish():
    parser = ToolCallParser()
    events = parser.feed("Hello <tool_")
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello"] and parser.content == "Hello"
    assert [e.text for e in parser.finish()] == [" <tool_"]
    assert parser.content == "Hello <tool_" and parser.calls == []

    parser = ToolCallParser()
    assert parser.feed("<tool") == [] and parser.feed("_call") == []
    assert [e.text for e in parser.finish()] == ["<tool_call"]
    assert parser.content == "<tool_call" and parser.calls == []

    # What turns out not to be the tag goes out with the next delta.
    parser = ToolCallParser()
    parser.feed("a <too")
    assert parser.content == "a"
    parser.feed("th")
    assert parser.content == "a <tooth"
    assert parser.finish() == [] and parser.content == "a <tooth"


@pytest.mark.parametrize("cut", [
    "<tool_call>\n",
    '<tool_call>\n{"name": "get_weather", "argu',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_ca',
])
def test_a_call_cut_short_is_not_complete(cut):
    for chunks in ([cut], list(cut)):
        parser, _ = fed(chunks)
        assert parser.complete_calls == [] and parser.content == ""
        assert all(not c.done for c in parser.calls)
    # after a complete call: only the first is complete
    parser = parse_tool_calls(ADD + "\n" + cut)
    assert [(c.name, c.arguments) for c in parser.complete_calls] == [("add", '{"a": 1, "b": 2}')]


def test_argument_escapes_survive_any_cut():
    """A backslash or quote at the end of a chunk leaves the parser inside the string: the braces in it never
    close the arguments."""
    args = '{"s": "\\\\", "t": "\\"}\\"", "u": "}}}"}'
    assert json.loads(args) == {"s": "\\", "t": '"}"', "u": "}}}"}
    text = block("f", args) + "\n" + block("g", "{}")
    for i in range(1, len(text)):
        parser, _ = fed([text[:i], text[i:]])
        assert [(c.name, c.arguments, c.done) for c in parser.calls] == [("f", args, True), ("g", "{}", True)], i


# ---- the prompt and the conversation's checks ----------------------------------------------------------------


def test_tools_are_shown_in_the_system_message_of_a_template_without_tools():
    tools = [Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}, "The weather")]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_1", "content": "20C"}]
    check_tool_messages(messages)
    chat, kwargs = tool_chat_inputs(messages, tools, template_has_tools=False)
    assert kwargs == {}
    assert chat[0]["role"] == "system" and json.dumps(tools[0].as_openai()) in chat[0]["content"]
    assert chat[2] == {"role": "assistant", "content": block("get_weather", '{"city": "Paris"}')}
    assert chat[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>\n"
                                                  "<tool_response>\n20C\n</tool_response>"}
    # A template that takes tools gets them, and the calls' arguments as objects.
    chat, kwargs = tool_chat_inputs(messages, tools, template_has_tools=True)
    assert kwargs == {"tools": [tools[0].as_openai()]}
    assert chat[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert template_takes_tools({"default": "{% if tools %}{{ tools }}{% endif %}"})
    assert template_takes_tools({"default": "x", "tool_use": "y"}) and not template_takes_tools({"default": "x"})


# ---- the grammar, with the default model's tokenizer -----------------------------------------------------------

WEATHER_TOOL = Tool("get_weather", {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False})
ADD_TOOL = Tool("add", {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 100}, "b": {"type": "integer"}}, "required": ["a", "b"]})
TOOLS = [WEATHER_TOOL, ADD_TOOL]
ADD_CALL = block("add", '{"a": 1, "b": 2}')
WEATHER_CALL = block("get_weather", '{"city": "Paris"}')


@pytest.fixture(scope="module")
def compiler(smollm2_dir) -> GrammarCompiler:
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    eos = sorted(set(tokenizer.eos_token_ids) | set(ModelConfig.from_dir(smollm2_dir).eos_token_ids))
    return GrammarCompiler(tokenizer, eos)


class Walk:
    """`text` fed token by token to a fresh matcher of `spec`, each token checked against the mask first (the
    engine's path). `ok`: every token was allowed; `refused`: the text up to the first refused token."""

    def __init__(self, compiler: GrammarCompiler, spec: StructuredOutput, text: str):
        self.compiler, self.matcher = compiler, compiler.matcher(spec)
        ids = compiler.tokenizer.encode(text, add_special_tokens=False)
        self.refused = None
        for i, t in enumerate(ids):
            if not self.allows(t):
                self.refused = compiler.tokenizer.decode(ids[: i + 1])
                return
            self.matcher.accept(t)

    @property
    def ok(self) -> bool:
        return self.refused is None

    def mask(self) -> torch.Tensor:
        row = torch.empty(bitmask_words(self.compiler.vocab_size), dtype=torch.int32)
        self.matcher.fill_bitmask(row)
        return row

    def allows(self, token_id: int, row: torch.Tensor | None = None) -> bool:
        row = self.mask() if row is None else row
        return bool((int(row[token_id // 32]) >> (token_id % 32)) & 1)

    def allowed(self) -> set[int]:
        bits = ((self.mask()[:, None].long() >> torch.arange(32)) & 1).view(-1)[: self.compiler.vocab_size]
        return set(bits.nonzero().view(-1).tolist())

    @property
    def eos_allowed(self) -> bool:
        row = self.mask()
        return any(self.allows(t, row) for t in self.compiler.eos_token_ids)


def accepts(compiler, spec, text: str) -> bool:
    return Walk(compiler, spec, text).ok


@pytest.mark.real
def test_required_starts_with_the_tag_and_nothing_else(compiler):
    spec = tool_call_grammar(TOOLS, "required")
    start = Walk(compiler, spec, "")
    tag = TOOL_CALL_OPEN.encode()
    allowed = start.allowed()
    assert allowed and not start.eos_allowed
    for t in allowed:
        piece = compiler.tokenizer.token_bytes(t)
        assert tag.startswith(piece) or piece.startswith(tag), piece
    for text in ["Hello", " <tool_call>", "\n<tool_call>", "<tool_calls>", "<tool>", "Sure.\n" + ADD_CALL]:
        assert not accepts(compiler, spec, text), text
    for call in (ADD_CALL, WEATHER_CALL, ADD_CALL + "\n" + WEATHER_CALL):
        walk = Walk(compiler, spec, call)
        assert walk.ok and walk.eos_allowed, walk.refused


@pytest.mark.real
@pytest.mark.parametrize("mode", ["required", "auto"])
def test_calls_must_be_declared_and_match_the_schema(compiler, mode):
    spec = tool_call_grammar(TOOLS, mode)
    bad = [
        block("subtract", '{"a": 1, "b": 2}'),  # no such function
        block("ad", '{"a": 1, "b": 2}'),  # a prefix of a declared name
        block("add", '{"a": "1", "b": 2}'),  # a string for an integer
        block("add", '{"a": 101, "b": 2}'),  # above the maximum
        block("add", '{"a": -1, "b": 2}'),  # below the minimum
        block("add", '{"a": 1.5, "b": 2}'),  # not an integer
        block("add", '{"a": 1}'),  # "b" is required
        block("get_weather", '{"unit": "celsius"}'),  # "city" is required
        block("get_weather", '{"city": "Paris", "unit": "kelvin"}'),  # not in the enum
        block("get_weather", '{"city": "Paris", "country": "FR"}'),  # additionalProperties: false
        block("get_weather", '{"city": "' + "x" * 41 + '"}'),  # maxLength
        block("get_weather", '{"city": "Paris"}').replace("\n</tool_call>", "</tool_call>"),  # the layout's newline
        '<tool_call>\n{"arguments": {"a": 1, "b": 2}, "name": "add"}\n</tool_call>',  # keys in order
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}, "extra": 1}\n</tool_call>',
        '<tool_call>\n{"name": "add"}\n</tool_call>',
    ]
    for text in bad:
        assert not accepts(compiler, spec, text), text
    for text in [ADD_CALL, WEATHER_CALL, block("get_weather", '{"city": "Paris", "unit": "fahrenheit"}'),
                 block("add", '{"a": 100, "b": -7}')]:
        assert accepts(compiler, spec, text), text


@pytest.mark.real
def test_auto_allows_free_text_and_eos(compiler):
    spec = tool_call_grammar(TOOLS, "auto")
    assert Walk(compiler, spec, "").eos_allowed  # an empty reply
    for text in ["Hello! The weather in Paris is sunny.", "Line one\nline two { not json", "a < b <tool"]:
        walk = Walk(compiler, spec, text)
        assert walk.ok and walk.eos_allowed, (text, walk.refused)
    for text in ["Let me look.\n" + ADD_CALL, ADD_CALL, ADD_CALL + "\n" + WEATHER_CALL]:
        walk = Walk(compiler, spec, text)
        assert walk.ok and walk.eos_allowed, (text, walk.refused)
    # Once the tag is written, the call grammar holds: no text, no EOS, until the call is complete.
    walk = Walk(compiler, spec, "Let me look.\n<tool_call>")
    assert walk.ok and not walk.eos_allowed
    assert not accepts(compiler, spec, "Let me look.\n<tool_call> oops")
    # After a call, only another call or EOS.
    assert not accepts(compiler, spec, ADD_CALL + " and more text")


@pytest.mark.real
@pytest.mark.parametrize("mode", ["required", "auto"])
def test_without_parallel_calls_eos_follows_the_first_call(compiler, mode):
    single = tool_call_grammar(TOOLS, mode, parallel=False)
    walk = Walk(compiler, single, ADD_CALL)
    assert walk.ok and walk.eos_allowed and walk.matcher.is_finished
    assert walk.allowed() <= set(compiler.eos_token_ids)
    assert not accepts(compiler, single, ADD_CALL + "\n" + WEATHER_CALL)
    assert not accepts(compiler, single, ADD_CALL + "\n<tool_call>")
    parallel = Walk(compiler, tool_call_grammar(TOOLS, mode, parallel=True), ADD_CALL)
    assert parallel.eos_allowed and not parallel.matcher.is_finished  # a second call may follow
    assert accepts(compiler, tool_call_grammar(TOOLS, mode), ADD_CALL + "\n" + WEATHER_CALL)


@pytest.mark.real
@pytest.mark.parametrize("parallel", [True, False])
def test_a_named_choice_allows_that_function_alone(compiler, parallel):
    spec = tool_call_grammar(TOOLS, "auto", function="add", parallel=parallel)  # named: calls, whatever the mode
    assert not Walk(compiler, spec, "").eos_allowed
    assert not accepts(compiler, spec, WEATHER_CALL)
    assert not accepts(compiler, spec, "Sure.\n" + ADD_CALL)
    assert not accepts(compiler, spec, ADD_CALL + "\n" + WEATHER_CALL)
    walk = Walk(compiler, spec, ADD_CALL)
    assert walk.ok and walk.eos_allowed
    assert accepts(compiler, spec, ADD_CALL + "\n" + ADD_CALL) == parallel
    # The only name the grammar spells is "add".
    walk = Walk(compiler, spec, '<tool_call>\n{"name": "')
    assert walk.ok and {compiler.tokenizer.token_bytes(t) for t in walk.allowed()} <= {b"a", b"ad", b"add",
                                                                                          b'add"', b'add",'}
    with pytest.raises(ValueError):
        tool_call_grammar(TOOLS, "required", function="nope")
    with pytest.raises(ValueError):
        tool_call_grammar(TOOLS, "none")


@pytest.mark.real
@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name":"add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "add","arguments": {"a": 1, "b": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments":{"a": 1, "b": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {"a":1, "b": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1,"b": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2} }\n</tool_call>',
    '<tool_call>\n{ "name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {\n"a": 1, "b": 2}}\n</tool_call>',
    '<tool_call> {"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
])
def test_the_json_layout_is_json_dumps(compiler, text):
    assert json.loads(text.split(">", 1)[1].rsplit("<", 1)[0]) == {"name": "add", "arguments": {"a": 1, "b": 2}}
    for mode in ("required", "auto"):
        assert not accepts(compiler, tool_call_grammar(TOOLS, mode), text)
    layout = '<tool_call>\n' + json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}}) + '\n</tool_call>'
    assert layout == ADD_CALL and accepts(compiler, tool_call_grammar(TOOLS, "required"), layout)


# ---- the goal: 50 schemas through the default model, every reply a valid call ---------------------------------


class Size(str, Enum):
    small = "small"
    medium = "medium"
    large = "large"


class Pizza(BaseModel):
    size: Size
    toppings: list[Literal["cheese", "ham", "mushroom", "olive", "pepper"]] = Field(default_factory=list,
                                                                                   max_length=4)


class PizzaOrder(BaseModel):
    pizza: Pizza
    delivery: bool
    note: Optional[str] = Field(None, max_length=40)


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false

    name: str = Field(max_length=30)
    quantity: int = Field(ge=1, le=99)


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false

    street: str = Field(max_length=50)
    city: str = Field(max_length=30)
    postcode: str = Field(pattern=r"^\d{5}$")


class Shipment(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false

    items: list[LineItem] = Field(min_length=1, max_length=3)
    ship_to: Address
    bill_to: Optional[Address] = None
    express: bool = False


class Reading(BaseModel):
    sensor: Literal["temp", "humidity", "pressure"]
    value: float = Field(ge=-100, le=2000)
    unit: Optional[Literal["C", "%", "hPa"]] = None


class ReadingLog(BaseModel):
    readings: list[Reading] = Field(max_length=3)
    station_id: int = Field(ge=1, le=9999)


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    schema = {"type": "object", "properties": properties, **extra}
    if required is not None:
        schema["required"] = required
    return schema


def s(max_length: int = 40, **extra) -> dict:
    return {"type": "string", "maxLength": max_length, **extra}


def i(lo: int | None = None, hi: int | None = None, **extra) -> dict:
    schema = {"type": "integer", **extra}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return schema


def n(lo: float, hi: float, **extra) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi, **extra}


B = {"type": "boolean"}

# name -> (parameters, the user's request)
SCHEMAS: dict[str, tuple[dict, str]] = {
    "get_weather": (obj({"city": s(), "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
                    "What's the weather like in Paris?"),
    "add_numbers": (obj({"a": i(), "b": i()}, ["a", "b"]), "What is 17 plus 25?"),
    "set_volume": (obj({"level": i(0, 100)}, ["level"]), "Turn the volume up to 80 percent."),
    "convert_temperature": (obj({"value": n(-273.15, 10000), "from_unit": {"enum": ["C", "F", "K"]},
                                 "to_unit": {"enum": ["C", "F", "K"]}}, ["value", "from_unit", "to_unit"]),
                            "Convert 100 degrees Fahrenheit to Celsius."),
    "toggle_light": (obj({"room": {"enum": ["kitchen", "bedroom", "living_room", "bathroom"]}, "on": B},
                         ["room", "on"]), "Switch off the kitchen light."),
    "send_email": (obj({"to": s(60, pattern=r"^[a-z0-9._]+@[a-z0-9]+\.[a-z]{2,4}$"), "subject": s(60),
                        "body": s(120)}, ["to", "subject", "body"]),
                   "Email bob@example.com that the meeting moved to 3pm."),
    "get_current_time": (obj({}), "What time is it?"),
    "list_files": (obj({}, additionalProperties=False), "List my files."),
    "search_web": (obj({"query": s(80, minLength=3), "num_results": i(1, 10)}, ["query"]),
                   "Search the web for the tallest building in the world."),
    "book_flight": (obj({"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                         "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                         "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}, "passengers": i(1, 9)},
                        ["origin", "destination", "date", "passengers"]),
                    "Book a flight from JFK to LAX on 2025-03-14 for two people."),
    "create_todo": (obj({"title": s(60), "priority": {"enum": ["low", "medium", "high"]},
                         "tags": {"type": "array", "items": s(15), "maxItems": 4}}, ["title", "priority"]),
                    "Add a high priority todo to buy milk."),
    "calculate_mean": (obj({"numbers": {"type": "array", "items": n(-1e6, 1e6), "minItems": 1, "maxItems": 8}},
                           ["numbers"]), "What is the average of 3, 5 and 10?"),
    "set_alarm": (obj({"hour": i(0, 23), "minute": i(0, 59), "repeat_daily": B}, ["hour", "minute"]),
                  "Wake me up at 7:30 every day."),
    "translate_text": (obj({"text": s(100), "target_language": {"enum": ["fr", "de", "es", "it", "ja"]}},
                           ["text", "target_language"]), "Translate 'good morning' into German."),
    "create_user": (obj({"user": obj({"name": s(40), "age": i(0, 150),
                                      "address": obj({"street": s(50), "city": s(30),
                                                      "zip": {"type": "string", "pattern": r"^\d{5}$"}},
                                                     ["street", "city", "zip"])}, ["name", "age", "address"])},
                        ["user"]), "Create a user named Alice, 30, living at 1 Main St, Springfield 12345."),
    "update_settings": (obj({"settings": obj({"theme": {"enum": ["light", "dark"]}, "font_size": i(8, 32),
                                              "notifications": B}, additionalProperties=False)}, ["settings"]),
                        "Switch to the dark theme and a font size of 14."),
    "find_restaurant": (obj({"cuisine": {"anyOf": [{"enum": ["italian", "chinese", "mexican", "indian"]},
                                                   {"type": "null"}]},
                             "price_level": i(1, 4), "open_now": B}, ["cuisine", "open_now"]),
                        "Find me a cheap Italian place that is open now."),
    "get_stock_price": (obj({"symbol": {"type": "string", "pattern": "^[A-Z]{1,5}$"}}, ["symbol"]),
                        "How is Apple stock doing?"),
    "schedule_meeting": (obj({"title": s(50), "attendees": {"type": "array", "items": s(40), "minItems": 1,
                                                            "maxItems": 4},
                              "duration_minutes": i(15, 240, multipleOf=15)},
                             ["title", "attendees", "duration_minutes"]),
                         "Schedule a one hour design review with Ann and Raj."),
    "set_reminder": (obj({"text": s(80), "when": {"type": ["string", "null"], "maxLength": 25}}, ["text", "when"]),
                     "Remind me to call mom."),
    "lookup_record": (obj({"id": {"anyOf": [i(1, 10 ** 6), {"type": "string", "pattern": r"^[a-z]{3}-\d{3}$"}]}},
                          ["id"]), "Look up record abc-123."),
    "order_pizza": (PizzaOrder.model_json_schema(), "I'd like a large pizza with ham and mushrooms, delivered."),
    "ship_order": (Shipment.model_json_schema(),
                   "Ship 2 lamps to 5 Oak Road, Boston 02110, express please."),
    "log_readings": (ReadingLog.model_json_schema(), "Station 42 reads 21.5 C and 40 % humidity."),
    "rate_movie": (obj({"movie": s(60), "rating": n(0, 10)}, ["movie", "rating"]),
                   "Give Inception a rating of 9."),
    "resize_image": (obj({"width": i(1, 4096), "height": i(1, 4096), "keep_aspect_ratio": B},
                         ["width", "height"]), "Resize the image to 800 by 600."),
    "roll_dice": (obj({"sides": {"type": "integer", "enum": [4, 6, 8, 10, 12, 20]}, "count": i(1, 10)},
                      ["sides", "count"]), "Roll two twenty-sided dice."),
    "get_directions": (obj({"origin": s(), "destination": s(),
                            "mode": {"enum": ["driving", "walking", "bicycling", "transit"]}},
                           ["origin", "destination", "mode"]), "How do I walk from the Louvre to the Eiffel Tower?"),
    "transpose_matrix": (obj({"matrix": {"type": "array", "maxItems": 3, "minItems": 1,
                                         "items": {"type": "array", "items": i(-99, 99), "minItems": 1,
                                                   "maxItems": 3}}}, ["matrix"]),
                         "Transpose the matrix [[1, 2], [3, 4]]."),
    "use_api_version": (obj({"version": {"const": "v2"}, "endpoint": s(30)}, ["version", "endpoint"]),
                        "Call the users endpoint of the v2 API."),
    "play_music": (obj({"artist": s(40), "song": s(60), "shuffle": B}, ["artist"]), "Play something by Queen."),
    "log_event": (obj({"level": {"enum": ["debug", "info", "warning", "error"]}, "message": s(100),
                       "labels": {"type": "object", "additionalProperties": s(20), "maxProperties": 3}},
                      ["level", "message"]), "Log an error that the disk is full."),
    "geocode": (obj({"latitude": n(-90, 90), "longitude": n(-180, 180)}, ["latitude", "longitude"]),
                "What is at latitude 48.85, longitude 2.35?"),
    "set_price": (obj({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e6},
                       "currency": {"enum": ["USD", "EUR", "GBP"]}}, ["price", "currency"]),
                  "Set the price to 19.99 euros."),
    "check_inventory": (obj({"sku": {"type": "string", "pattern": r"^SKU-\d{4}$"},
                             "warehouse": {"enum": ["north", "south", "east", "west"]}}, ["sku"]),
                        "How many of SKU-0042 are in the north warehouse?"),
    "plot_point": (obj({"point": {"type": "array", "prefixItems": [n(-100, 100), n(-100, 100)], "items": False,
                                  "minItems": 2, "maxItems": 2}, "label": s(20)}, ["point"]),
                   "Plot the point (3, 4) labelled A."),
    "set_dark_mode": (obj({"enabled": B}, ["enabled"]), "Turn on dark mode."),
    "create_org": (obj({"org": obj({"name": s(30), "department": obj({"name": s(30), "team": obj({
        "name": s(30), "lead": obj({"name": s(30), "email": s(40)}, ["name"])}, ["name", "lead"])},
        ["name", "team"])}, ["name", "department"])}, ["org"]),
                   "Create Acme with a research department whose AI team is led by Dana."),
    "add_contacts": (obj({"contacts": {"type": "array", "maxItems": 3, "minItems": 1, "items": obj(
        {"name": s(30), "phone": {"type": "string", "pattern": r"^\+?\d{7,12}$"}}, ["name", "phone"],
        additionalProperties=False)}}, ["contacts"]), "Save Tom's number, 5551234567."),
    "make_payment": (obj({"amount": n(0.01, 10000), "method": {"oneOf": [
        obj({"card_number": {"type": "string", "pattern": r"^\d{16}$"}}, ["card_number"], additionalProperties=False),
        obj({"paypal_email": s(50)}, ["paypal_email"], additionalProperties=False)]}}, ["amount", "method"]),
                     "Pay 25 dollars with my PayPal, me@mail.com."),
    "set_flag": (obj({"flag": {"enum": ["beta", 1, True, None]}}, ["flag"]), "Enable the beta flag."),
    "create_event": (obj({"title": s(50), "date": {"type": "string", "format": "date"}}, ["title", "date"]),
                     "Add the company picnic on June 5th 2025 to my calendar."),
    "set_probability": (obj({"p": n(0, 1)}, ["p"]), "Set the dropout probability to one half."),
    "choose_plan": (obj({"plan": {"type": "string", "enum": ["basic"]}}, ["plan"]), "Sign me up for the basic plan."),
    "summarize_text": (obj({"text": s(150), "max_words": i(10, 100)}, ["text"]),
                       "Summarize: The quick brown fox jumps over the lazy dog."),
    "set_thermostat": (obj({"temperature": n(10, 30), "mode": {"enum": ["heat", "cool", "auto"]},
                            "schedule": {"anyOf": [obj({"start_hour": i(0, 23), "end_hour": i(0, 23)},
                                                       ["start_hour", "end_hour"]), {"type": "null"}]}},
                           ["temperature", "mode"]), "Heat the house to 21 degrees."),
    "kill_process": (obj({"pid": i(1), "force": B, "signal": {"enum": ["SIGTERM", "SIGKILL"]}}, ["pid"]),
                     "Kill process 4242."),
    "legacy_refs": ({"type": "object", "definitions": {"Color": {"enum": ["red", "green", "blue"]}},
                     "properties": {"background": {"$ref": "#/definitions/Color"},
                                    "foreground": {"$ref": "#/definitions/Color"}},
                     "required": ["background"]}, "Make the background blue."),
    "count_words": (obj({"text": s(120), "case_sensitive": {"type": "boolean", "default": False}}, ["text"],
                        additionalProperties=False), "How many words are in 'to be or not to be'?"),
    "get_news": (obj({"topic": {"type": ["string", "null"], "enum": ["sports", "tech", "politics", None]},
                      "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": 20}}, ["topic", "limit"]),
                 "Show me the top 5 tech headlines."),
}

GOAL_MAX_TOKENS = 320


def goal_cases() -> list[tuple[str, list[Tool], str | None]]:
    """(function, the tools declared, the named choice or None for "required"): even cases "required" with that
    tool alone (parallel calls allowed), odd ones a named choice among it and the next tool (one call: greedy, the
    small model would repeat a named call until max_tokens)."""
    names = list(SCHEMAS)
    cases = []
    for k, name in enumerate(names):
        tool = Tool(name, SCHEMAS[name][0], SCHEMAS[name][1].rstrip("?.!"))
        if k % 2 == 0:
            cases.append((name, [tool], None))
        else:
            other = names[(k + 1) % len(names)]
            cases.append((name, [Tool(other, SCHEMAS[other][0]), tool], name))
    return cases


def test_the_goal_schemas_are_valid_and_varied():
    assert len(SCHEMAS) == 50
    for name, (schema, _) in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        check_tools([Tool(name, schema)])
    text = json.dumps(list(SCHEMAS.values()))
    for keyword in ("enum", "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum",
                    "multipleOf", "boolean", "minItems", "maxItems", "prefixItems", "anyOf", "oneOf", '"null"',
                    "$defs", "$ref", "definitions", "const", "format", "additionalProperties"):
        assert keyword in text, keyword
    assert sum(not schema.get("properties") for schema, _ in SCHEMAS.values()) >= 2  # tools without parameters
    assert sum(set(schema.get("required", [])) < set(schema.get("properties", {}))
               for schema, _ in SCHEMAS.values()) >= 10  # optional properties


@pytest.fixture(scope="module")
def default_llm(smollm2_dir) -> LLM:
    # 50 prompts of ~350 tokens without preemption; batch_invariant=False: decode rows batched (on some CPUs an
    # invariant engine runs them one per call), and the test wants valid calls, not particular ones.
    return LLM(smollm2_dir, dtype="float32", kv_cache_memory=1536 << 20, batch_invariant=False)


@pytest.mark.real
@pytest.mark.slow
def test_every_reply_is_a_valid_call_of_the_right_function(default_llm):
    llm, cases = default_llm, goal_cases()
    has_tools = template_takes_tools(llm.tokenizer.chat_templates)
    prompts, params = [], []
    for (name, tools, function) in cases:
        messages = [{"role": "user", "content": SCHEMAS[name][1]}]
        chat, kwargs = tool_chat_inputs(messages, tools, template_has_tools=has_tools)
        prompts.append(llm.chat_prompt(chat, **kwargs))
        grammar = tool_call_grammar(tools, "required", function=function, parallel=function is None)
        params.append(SamplingParams(temperature=0, max_tokens=GOAL_MAX_TOKENS, structured_output=grammar))
    outs = llm.generate(prompts, params)
    failures = []
    for (name, tools, function), out in zip(cases, outs):
        why = None
        parser = parse_tool_calls(out.text)
        if out.finish_reason != "stop":
            why = f"finish_reason {out.finish_reason!r} after {out.num_output_tokens} tokens"
        elif not parser.calls or len(parser.complete_calls) != len(parser.calls) or parser.content:
            why = "not a reply of complete calls"
        elif "\n".join(block(c.name, c.arguments) for c in parser.calls) != out.text:
            why = "not the grammar's layout"
        else:
            for call in parser.calls:
                if call.name != name:
                    why = f"called {call.name!r}"
                    break
                try:
                    args = json.loads(call.arguments)
                    jsonschema.validate(args, SCHEMAS[name][0], format_checker=jsonschema.FormatChecker())
                except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                    why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    break
        if why is not None:
            failures.append(f"{name} ({'named' if function else 'required'}): {why}\n    {out.text!r}")
    assert not failures, f"{len(failures)} of {len(cases)} replies fail:\n" + "\n".join(failures)


# ---- HTTP, on a tiny model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    """A random tiny model with a byte tokenizer; its context widened to 4096, room for the tool preamble (the
    random weights have no use for the positions, and RoPE has no limit)."""
    out = tmp_path_factory.mktemp("tools") / "tiny"
    make_checkpoint(out, num_kv_heads=2, layers=2, hidden=64)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (out / "config.json").write_text(json.dumps(config))
    return LLM(out, dtype="float32")


@pytest.fixture(scope="module")
def live(tiny_llm):
    with LiveServer(create_app(tiny_llm, ServerSettings())) as server:
        yield server


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def fn(name: str, parameters: dict | None = None, **extra) -> dict:
    function = {"name": name, **extra}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
         "additionalProperties": False}
HTTP_TOOLS = [fn("get_weather", CITY, description="The weather in a city"), fn("count", COUNT)]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def chat(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, "temperature": 0, **body})


def error_param(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"], err
    return err["param"]


BAD_DEFINITIONS = {
    "duplicate names": (dict(tools=[fn("f"), fn("f")]), "tools[1].function.name"),
    "duplicate after another": (dict(tools=[fn("f"), fn("g"), fn("f", CITY)]), "tools[2].function.name"),
    "name with spaces": (dict(tools=[fn("f"), fn("get weather")]), "tools[1].function.name"),
    "name too long": (dict(tools=[fn("x" * 65)]), "tools[0].function.name"),
    "unknown tool type": (dict(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type"),
    "parameters of type string": (dict(tools=[fn("f"), fn("g", {"type": "string"})]), "tools[1].function.parameters"),
    "parameters not an object": (dict(tools=[fn("f", [1, 2])]), "tools[0].function.parameters"),
    "uncompilable property": (dict(tools=[fn("f", {"type": "object", "properties": {"a": {"type": "frobnicate"}}})]),
                              "tools[0].function.parameters"),
    "uncompilable in the second tool": (dict(tools=[fn("f", CITY), fn("g", {"type": "object", "properties": {
        "a": {"type": "frobnicate"}}})]), "tools[1].function.parameters"),
    "type frobnicate": (dict(tools=[fn("f", {"type": "frobnicate"})]), "tools[0].function.parameters"),
    "dangling $ref": (dict(tools=[fn("f", {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})]),
                      "tools[0].function.parameters"),
    "tool_choice names no declared tool": (dict(tools=HTTP_TOOLS, tool_choice={
        "type": "function", "function": {"name": "nope"}}), "tool_choice.function.name"),
    "tool_choice named without tools": (dict(tool_choice={"type": "function", "function": {"name": "f"}}),
                                        "tool_choice.function.name"),
    "tool_choice required without tools": (dict(tool_choice="required"), "tool_choice"),
    "tool_choice unknown": (dict(tools=HTTP_TOOLS, tool_choice="always"), "tool_choice"),
    "too many tools": (dict(tools=[fn(f"f{k}") for k in range(129)]), "tools"),
    "tools with response_format": (dict(tools=HTTP_TOOLS, tool_choice="required",
                                        response_format={"type": "json_object"}), "response_format"),
    "tool message answers no call": (dict(messages=[
        USER[0], {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]), "messages[2].tool_call_id"),
    "tool message before any call": (dict(messages=[USER[0], {"role": "tool", "tool_call_id": "call_1",
                                                               "content": "sunny"}]), "messages[1].tool_call_id"),
    "tool message without tool_call_id": (dict(messages=[USER[0], {"role": "tool", "content": "x"}]),
                                          "messages[1].tool_call_id"),
    "arguments not JSON": (dict(messages=[
        USER[0], {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}]),
        "messages[1].tool_calls[1].function.arguments"),
    "arguments not an object": (dict(messages=[
        USER[0], {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}]}]),
        "messages[1].tool_calls[0].function.arguments"),
}


@pytest.mark.parametrize("case", list(BAD_DEFINITIONS))
def test_a_bad_definition_is_a_400_naming_the_field(http, case):
    body, param = BAD_DEFINITIONS[case]
    for stream in (False, True):
        r = chat(http, **body, stream=stream)
        assert error_param(r) == param, (stream, r.json())


def test_engine_checks_name_the_field():
    for tools, param in [([Tool("f"), Tool("f")], "tools[1].name"), ([Tool("a b")], "tools[0].name"),
                         ([Tool("f", {"type": "array"})], "tools[0].parameters"),
                         ([Tool("f", {"type": "object", "x": float("nan")})], "tools[0].parameters")]:
        with pytest.raises(RequestError) as e:
            check_tools(tools)
        assert e.value.param == param, tools
    with pytest.raises(RequestError) as e:
        check_tool_messages([{"role": "assistant", "tool_calls": [
            {"id": "a", "function": {"name": "f", "arguments": "nope"}}]}, {"role": "tool", "tool_call_id": "a"}])
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"


def deep_schema(levels: int) -> str:
    """A parameters schema of `levels` nested objects, as JSON text (json.dumps itself recurses too deep)."""
    return '{"type": "object", "properties": {"x": ' * levels + '{"type": "string"}' + '}}' * levels


def deep_arrays(levels: int) -> str:
    arrays = '{"type": "array", "items": ' * levels + '{}' + '}' * levels
    return '{"type": "object", "properties": {"a": ' + arrays + '}}'


# name -> (the parameters schema, as JSON text or as a dict; "refused": a 400 naming the parameters, "bounded": a 4xx
# or a 200, in time either way)
HOSTILE = {
    # JSON levels, as check_schema_depth counts them: an object and its "properties" are two
    "depth 500": (deep_schema(250), "refused"),
    "depth 500 of arrays": (deep_arrays(500), "refused"),
    "depth 130": (deep_schema(65), "refused"),
    "enum of 100k strings": (obj({"e": {"enum": [f"value-{k}" for k in range(100_000)]}}, ["e"]), "bounded"),
    "enum of 3000 strings": (obj({"e": {"enum": [f"v{k}" for k in range(3000)]}}, ["e"]), "bounded"),
    "(a+)+": (obj({"s": {"type": "string", "pattern": "^(a+)+$"}}, ["s"]), "bounded"),
    "nested counted repeats": (obj({"s": {"type": "string", "pattern": "^((a{1,50}){1,50}){1,50}$"}}, ["s"]),
                               "bounded"),
    "(a|aa)*c": (obj({"s": {"type": "string", "pattern": "^(a|aa)*c$"}}, ["s"]), "bounded"),
    "(.*a){25}": (obj({"s": {"type": "string", "pattern": "(.*a){25}"}}, ["s"]), "bounded"),
    "huge counted repeat": (obj({"s": {"type": "string", "pattern": "^[a-z]{1,100000}$"}}, ["s"]), "bounded"),
    "5000 properties": (obj({f"property_{k}": {"type": "integer"} for k in range(5000)}), "bounded"),
    "5000 short properties": (obj({f"p{k}": {} for k in range(5000)}), "bounded"),
    "5000 required properties": (obj({f"p{k}": {} for k in range(5000)}, [f"p{k}" for k in range(5000)]),
                                 "bounded"),
}
HOSTILE_TIMEOUT_S = 30


def tools_body(parameters: str, **fields) -> str:
    """A chat request declaring one tool "f" of these parameters (JSON text), as JSON text."""
    rest = json.dumps({"messages": USER, "max_tokens": 16, "temperature": 0, **fields})
    return ('{"tools": [{"type": "function", "function": {"name": "f", "parameters": ' + parameters + '}}], '
            + rest[1:])


def post_hostile(http: httpx.Client, parameters: str, **fields) -> httpx.Response:
    t0 = time.monotonic()
    r = http.post("/v1/chat/completions", content=tools_body(parameters, **fields),
                  headers={"content-type": "application/json"}, timeout=HOSTILE_TIMEOUT_S)
    assert time.monotonic() - t0 < HOSTILE_TIMEOUT_S
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:500]
    return r


def assert_still_serving(http: httpx.Client) -> None:
    ok = chat(http, tools=HTTP_TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=160)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "tool_calls", ok.text


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_schemas_are_refused_or_bounded(http, case):
    """Generation runs far enough (200 byte tokens) to write into the hostile strings, where a regex's lexer
    states are built."""
    schema, expect = HOSTILE[case]
    r = post_hostile(http, schema if isinstance(schema, str) else json.dumps(schema), tool_choice="required",
                     parallel_tool_calls=False, max_tokens=200)
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and "RecursionError" not in err["message"], err
    if expect == "refused":
        assert error_param(r) == "tools[0].function.parameters"
    if r.status_code == 200:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("tool_calls", "length"), choice
        for call in choice["message"].get("tool_calls") or []:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    assert_still_serving(http)


def test_nesting_past_the_json_parser_is_a_4xx_and_the_server_carries_on(http):
    """500 nested objects (1000 JSON levels) and 5000: at or past what Python's JSON parser nests (its
    recursion limit, which the interpreter's stack and the running thread decide), so the body is either
    refused unread (400 invalid_json) or read and refused by the depth rule (400 naming the field); never a
    500 or a hang."""
    for objects in (500, 5000):
        r = post_hostile(http, deep_schema(objects), tool_choice="required")
        error = r.json()["error"]
        assert r.status_code == 400, r.text[:300]
        assert error["code"] == "invalid_json" or error["param"] == "tools[0].function.parameters", error
        assert_still_serving(http)


def a_bomb(prop: str) -> str:
    """Nested counted repeats: llguidance builds its lexer lazily, and gives up ("too many expressions
    constructed") some 20 characters into the string. A property name of its own per test: a fresh cache key."""
    return json.dumps(obj({prop: {"type": "string", "pattern": "^((a{1,50}){1,50}){1,50}$"}}, [prop]))


def biased_to_a(tiny_llm) -> dict:
    """logit_bias that makes the tiny model write "a" wherever the grammar allows it (the pattern does for
    2500+ characters)."""
    return {str(tiny_llm.tokenizer.encode("a", add_special_tokens=False)[0]): 100}


def test_a_grammar_that_gives_up_mid_call_is_not_a_clean_stop(http, tiny_llm):
    """llguidance's lexer gives up mid-string (too many expressions): its mask then allows EOS alone, which
    it accepts; the request must end as an error, not as a clean stop with an unfinished call."""
    r = http.post("/v1/chat/completions", content=tools_body(a_bomb("s1"), tool_choice="required",
                                                              parallel_tool_calls=False, max_tokens=200,
                                                              logit_bias=biased_to_a(tiny_llm)),
                  headers={"content-type": "application/json"}, timeout=HOSTILE_TIMEOUT_S)
    if r.status_code == 500:  # the engine ended this request alone (the others run on), saying why, briefly
        message = r.json()["error"]["message"]
        assert "GrammarError" in message and "too many expressions" in message and len(message) < 400, message
        assert_still_serving(http)
        return
    assert r.status_code == 200, r.text[:500]
    if r.status_code == 200:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("tool_calls", "length", "error"), choice
        if choice["finish_reason"] == "tool_calls":
            for call in choice["message"]["tool_calls"]:
                json.loads(call["function"]["arguments"])


def test_a_grammar_that_gave_up_once_still_serves_the_next_request(http, tiny_llm):
    """Matchers share their template's lexer: the failed one's template is dropped, so the next request of
    the same schema compiles afresh instead of failing at its first token."""
    first = http.post("/v1/chat/completions", content=tools_body(a_bomb("s2"), tool_choice="required",
                                                                  parallel_tool_calls=False, max_tokens=200,
                                                                  logit_bias=biased_to_a(tiny_llm)),
                      headers={"content-type": "application/json"}, timeout=HOSTILE_TIMEOUT_S)
    assert first.status_code in (200, 400, 500), first.text[:300]  # 500: the grammar gave up (the test above)
    r = http.post("/v1/chat/completions", content=tools_body(a_bomb("s2"), tool_choice="required",
                                                              parallel_tool_calls=False, max_tokens=160),
                  headers={"content-type": "application/json"}, timeout=HOSTILE_TIMEOUT_S)
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text[:300]


def check_tool_call(call: dict, names: set[str]) -> dict:
    assert call["id"].startswith("call_") and len(call["id"]) > 5
    assert call["type"] == "function" and call["function"]["name"] in names
    assert isinstance(call["function"]["arguments"], str)
    args = json.loads(call["function"]["arguments"])
    schema = {"get_weather": CITY, "count": COUNT}[call["function"]["name"]]
    jsonschema.validate(args, schema)
    return args


def sse(r: httpx.Response) -> list:
    events = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "count"}}])
def test_a_chat_completion_with_tools(http, tool_choice):
    r = chat(http, tools=HTTP_TOOLS, tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=160)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    assert len(message["tool_calls"]) == 1
    names = {"get_weather", "count"} if tool_choice == "required" else {"count"}
    check_tool_call(message["tool_calls"][0], names)


def test_parallel_calls_each_complete_and_valid(http):
    r = chat(http, tools=HTTP_TOOLS, tool_choice="required", max_tokens=160)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    assert calls or choice["finish_reason"] == "length", choice
    for call in calls:
        check_tool_call(call, {"get_weather", "count"})
    assert len({c["id"] for c in calls}) == len(calls)
    assert choice["finish_reason"] == ("tool_calls" if choice["finish_reason"] != "length" else "length")


@pytest.mark.parametrize("tool_choice, parallel", [("required", False), ("required", True),
                                                   ({"type": "function", "function": {"name": "get_weather"}}, False)])
def test_a_streamed_chat_completion_with_tools(http, tool_choice, parallel):
    body = {"messages": USER, "tools": HTTP_TOOLS, "tool_choice": tool_choice, "parallel_tool_calls": parallel,
            "max_tokens": 160, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(r is None for r in reasons[:-1])
    calls: dict[int, dict] = {}
    for delta in deltas[1:]:
        assert not delta.get("content"), delta  # no text under "required" / a named choice
        for piece in delta.get("tool_calls") or []:
            k = piece["index"]
            if k not in calls:  # the first delta of a call: index, id, type and name, no arguments yet
                assert k == len(calls) and piece["id"].startswith("call_") and piece["type"] == "function"
                assert piece["function"] == {"name": piece["function"]["name"], "arguments": ""}
                calls[k] = {"id": piece["id"], "type": "function",
                            "function": {"name": piece["function"]["name"], "arguments": ""}}
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                assert piece["function"]["arguments"]
                calls[k]["function"]["arguments"] += piece["function"]["arguments"]
    assert calls
    # the same reply whole (greedy): the calls it keeps are the complete ones
    whole = chat(http, **{k: v for k, v in body.items() if k not in ("stream", "messages")})
    assert whole.json()["choices"][0]["finish_reason"] == reasons[-1]
    message = whole.json()["choices"][0]["message"]
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    streamed = [(c["function"]["name"], c["function"]["arguments"]) for c in calls.values()]
    if reasons[-1] == "length":  # parallel calls up to the token limit: the last one streamed may be cut short
        assert parallel and streamed[: len(want)] == want and len(streamed) - len(want) in (0, 1)
        streamed = want
    else:
        assert reasons[-1] == "tool_calls"
    assert streamed == want and want
    if not parallel:
        assert len(want) == 1
    names = {"get_weather", "count"} if tool_choice == "required" else {"get_weather"}
    for call in message["tool_calls"]:
        check_tool_call(call, names)


def test_each_choice_of_n_gets_its_own_calls(http):
    r = chat(http, tools=HTTP_TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=160, n=3,
             temperature=1.0, seed=7)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    ids = []
    for choice in choices:
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        check_tool_call(call, {"get_weather", "count"})
        ids.append(call["id"])
    assert len(set(ids)) == 3


def test_streamed_logprobs_cover_every_token_of_the_calls(http):
    """Tokens held back by the parser (a call's tag and head) still get their logprobs, in `content: ""` deltas."""
    body = {"messages": USER, "tools": HTTP_TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": 160, "temperature": 0, "stream": True, "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    entries = [e for ev in events[:-2] for c in ev["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    assert len(entries) == events[-2]["usage"]["completion_tokens"]
    assert bytes(b for e in entries for b in e["bytes"]).decode().startswith("<tool_call>\n{\"name\": ")
    assert [ev["choices"][0]["finish_reason"] for ev in events[:-2]][-1] == "tool_calls"


def test_tool_choice_none_gives_plain_content(http):
    r = chat(http, tools=HTTP_TOOLS, tool_choice="none", max_tokens=12)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "tool_calls" not in choice["message"] and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    # the same as without tools: "none" shows the model no tools
    plain = chat(http, max_tokens=12).json()["choices"][0]["message"]["content"]
    assert choice["message"]["content"] == plain
    with http.stream("POST", "/v1/chat/completions", json={"messages": USER, "tools": HTTP_TOOLS, "max_tokens": 12,
                                                           "temperature": 0, "tool_choice": "none",
                                                           "stream": True}) as r:
        events = sse(r)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert all("tool_calls" not in d for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == plain
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_auto_without_tools_is_plain_text(http):
    """What some clients send by default (tools: [] and tool_choice "auto") asks for no calls."""
    plain = chat(http, max_tokens=12).json()["choices"][0]
    for body in (dict(tools=[], tool_choice="auto"), dict(tool_choice="auto"), dict(tools=[]),
                 dict(tool_choice="none")):
        r = chat(http, max_tokens=12, **body)
        assert r.status_code == 200, (body, r.text)
        assert r.json()["choices"][0] == plain, body


def test_auto_answers_with_text_or_valid_calls(http):
    r = chat(http, tools=HTTP_TOOLS, max_tokens=48)  # tool_choice defaults to "auto" with tools
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    for call in choice["message"].get("tool_calls") or []:
        check_tool_call(call, {"get_weather", "count"})
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")


def test_a_conversation_with_earlier_calls_and_results(http, live, tiny_llm):
    """The assistant's calls and the tools' results go back into the prompt (the tiny model's template takes no
    tools: they are written out as blocks and <tool_response> messages)."""
    messages = [
        {"role": "system", "content": "Be brief."},
        USER[0],
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "count", "arguments": '{"n": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "3"}]},
    ]
    r = chat(http, messages=messages, tools=HTTP_TOOLS, tool_choice="none", max_tokens=4)
    assert r.status_code == 200, r.text
    chat_msgs, _ = tool_chat_inputs(messages[:4] + [{**messages[4], "content": "3"}],
                                    [Tool("get_weather", CITY, "The weather in a city"), Tool("count", COUNT)],
                                    template_has_tools=False)
    # tool_choice "none" shows no tools; the calls and results are written all the same
    no_tools, _ = tool_chat_inputs(messages[:4] + [{**messages[4], "content": "3"}], [], template_has_tools=False)
    assert chat_msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    want = live.on_engine_thread(lambda: tiny_llm.chat_prompt(no_tools))
    assert r.json()["usage"]["prompt_tokens"] == len(want)
    r = chat(http, messages=messages, tools=HTTP_TOOLS, tool_choice="required", parallel_tool_calls=False,
             max_tokens=160)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "tool_calls", r.text
    want = live.on_engine_thread(lambda: tiny_llm.chat_prompt(chat_msgs))
    assert r.json()["usage"]["prompt_tokens"] == len(want)


def test_tokenize_counts_the_prompt_with_its_tools(http):
    """/tokenize with messages and tools gives the prompt chat completions runs (the preamble included)."""
    messages = USER
    plain = http.post("/tokenize", json={"messages": messages}).json()["count"]
    with_tools = http.post("/tokenize", json={"messages": messages, "tools": HTTP_TOOLS}).json()["count"]
    assert with_tools > plain + 50
    r = chat(http, tools=HTTP_TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=160)
    assert r.json()["usage"]["prompt_tokens"] == with_tools
    r = http.post("/tokenize", json={"prompt": "x", "tools": HTTP_TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
