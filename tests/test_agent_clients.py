"""Agent and application frameworks against a live `kvmini serve` (the real command, in a subprocess) on the
default model: the openai client (tool calls, streamed tool calls, the Responses API), LangChain's
`ChatOpenAI.bind_tools` with a tool-message round trip, a pydantic-ai agent with a tool and a structured
result, and the OpenAI Agents SDK through its chat-completions model and its Responses model.

Each framework's own parsing is what checks the wire format: before tool calling, every one of these
requests was a 400. SmolLM2-135M is a small model: the tests assert what the protocol guarantees (a call of a
declared function with arguments that match its schema; a finished run), not the model's judgement.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.slow

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                                "parameters": WEATHER_SCHEMA}}]
RESPONSE_TOOLS = [{"type": "function", "name": "get_weather", "description": "Get the weather in a city",
                   "parameters": WEATHER_SCHEMA}]
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    """`kvmini serve` on the default model, on a free loopback port; its URL (…/v1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "kvmini"), "serve", str(smollm2_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvmini serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvmini serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(f"{server}/models").json()["data"][0]["id"]


@pytest.fixture(autouse=True)
def _no_tracing(monkeypatch):
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")  # the Agents SDK would post traces to OpenAI


def _valid_weather_call(name: str, arguments: str | dict) -> None:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert name == "get_weather"
    jsonschema.validate(args, WEATHER_SCHEMA)


# ---- openai ----------------------------------------------------------------------------------------------


def test_openai_chat_tool_call_and_tool_message_round_trip(server, model):
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=model, messages=messages, tools=CHAT_TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    _valid_weather_call(call.function.name, call.function.arguments)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    final = client.chat.completions.create(model=model, messages=messages, tools=CHAT_TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=30)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content


def test_openai_streamed_tool_calls(server, model):
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], tools=CHAT_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True, temperature=0)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
            if piece.id is not None:
                call["id"], call["name"] = piece.id, piece.function.name
            call["arguments"] += piece.function.arguments or ""
            call["pieces"] += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    for call in calls.values():
        assert call["id"].startswith("call_") and call["pieces"] > 2  # the arguments came in pieces
        _valid_weather_call(call["name"], call["arguments"])


def test_openai_responses_text_tool_call_and_stream(server, model):
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused")
    text = client.responses.create(model=model, input="What is the capital of France? One word.",
                                   instructions="Answer briefly.", max_output_tokens=20, temperature=0)
    assert text.status == "completed" and "Paris" in text.output_text
    assert text.usage.input_tokens > 0 and text.usage.output_tokens > 0

    called = client.responses.create(model=model, input=QUESTION, tools=RESPONSE_TOOLS, tool_choice="required",
                                     parallel_tool_calls=False, temperature=0)
    [call] = called.output
    assert call.type == "function_call" and call.call_id.startswith("call_")
    _valid_weather_call(call.name, call.arguments)
    answer = client.responses.create(
        model=model, tools=RESPONSE_TOOLS, tool_choice="none", temperature=0, max_output_tokens=30,
        input=[{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert answer.status == "completed" and answer.output_text

    kinds = []
    with client.responses.stream(model=model, input=QUESTION, tools=RESPONSE_TOOLS, tool_choice="required",
                                 temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    assert final.output and all(item.type == "function_call" for item in final.output)
    for item in final.output:
        _valid_weather_call(item.name, item.arguments)


# ---- langchain-openai ------------------------------------------------------------------------------------


def test_langchain_bind_tools_then_tool_message(server, model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return f"18 C and sunny in {city}"

    llm = ChatOpenAI(base_url=server, api_key="unused", model=model, temperature=0, max_tokens=60)
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(QUESTION)
    assert ai.tool_calls and all(c["name"] == "get_weather" for c in ai.tool_calls)
    assert all(isinstance(c["args"]["city"], str) for c in ai.tool_calls)
    history = [HumanMessage(QUESTION), ai] + [ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"])
                                              for c in ai.tool_calls]
    final = llm.bind_tools([get_weather]).invoke(history)
    assert final.content or final.tool_calls  # "auto": text, or calls that parsed


# ---- pydantic-ai -----------------------------------------------------------------------------------------


def test_pydantic_ai_agent_with_a_tool_and_a_structured_result(server, model):
    from pydantic import BaseModel
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    class Weather(BaseModel):
        city: str
        temperature_c: int

    agent = Agent(OpenAIChatModel(model, provider=OpenAIProvider(base_url=server, api_key="unused")),
                  output_type=Weather, model_settings={"temperature": 0, "parallel_tool_calls": False})

    @agent.tool_plain
    def get_temperature(city: str) -> int:
        """The temperature in a city, in degrees Celsius."""
        return 18

    # pydantic-ai sends both tools (get_temperature and its output tool final_result) with tool_choice
    # "required"; the structured result is the output tool's arguments, validated by pydantic.
    result = agent.run_sync("Report the weather in Paris with final_result.", usage_limits=UsageLimits(request_limit=4))
    assert isinstance(result.output, Weather) and isinstance(result.output.temperature_c, int)


# ---- openai-agents ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_openai_agents_sdk_function_tool(server, model, api):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool
    from openai import AsyncOpenAI

    used = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        used.append(city)
        return f"18 C and sunny in {city}"

    client = AsyncOpenAI(base_url=server, api_key="unused")
    model_class = OpenAIChatCompletionsModel if api == "chat_completions" else OpenAIResponsesModel
    agent = Agent(name="assistant", instructions="You answer questions about the weather.", tools=[get_weather],
                  model=model_class(model=model, openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=200))
    # The SDK resets tool_choice to "auto" after a tool ran, so the second turn may answer in text.
    result = Runner.run_sync(agent, QUESTION, max_turns=4)
    assert used and all(isinstance(city, str) for city in used)
    kinds = [type(item).__name__ for item in result.new_items]
    assert "ToolCallItem" in kinds and "ToolCallOutputItem" in kinds and kinds[-1] == "MessageOutputItem"
    assert isinstance(result.final_output, str)
