"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions (tool calls too), /v1/models."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from engine.capture.request import token_char_offsets
from engine.core.errors import RequestError
from engine.core.outputs import RequestOutput, TokenLogprob
from engine.text.tool_calls import ArgumentsDelta, CallStarted, TextDelta
from server.engine_loop import EngineStepError, Submission
from server.errors import APIError, error_body
from server.params import chat_prompt_ids, check_model, check_n, max_tokens_for, prompt_ids, request_errors, submissions
from server.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice
from server.state import ServerState, server_state
from server.streaming import SSE_DONE, SSE_KEEPALIVE, collect, finite, outputs, sse, stream_response
from server.tools import CHAT_FIELDS, ToolRequest, call_json, chat_tools, finish_reason, tool_request

router = APIRouter()

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # completions' text_offset of each token
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache

    def add(self, out: RequestOutput) -> None:
        self.cached_tokens = out.num_cached_prompt_tokens
        for lp in out.new_logprobs or []:
            self.logprobs.append(lp)
            self.offsets.append(len(self.text))
        self.text += out.new_text
        self.num_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


def _usage(num_prompt: int, choices: list[Choice], n: int | None = None) -> dict:
    """OpenAI's usage over choices of one prompt (or of several, `n` per prompt): each prompt's tokens count
    once, as vLLM counts them; `cached_tokens`: what each prompt's first choice found in the prefix cache."""
    completion = sum(c.num_tokens for c in choices)
    cached = sum(c.cached_tokens for c in choices[:: n or len(choices)])
    return {"prompt_tokens": num_prompt, "completion_tokens": completion, "total_tokens": num_prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Tokens:
    """Token id -> its text, for logprobs (special tokens shown, as their text is not in the output)."""

    def __init__(self, state: ServerState):
        self.tokenizer = state.llm.tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tokenizer.decode([token_id])
        return s

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes: right also for a token that holds part of a character (its text is U+FFFD)."""
        return list(self.tokenizer.token_bytes(token_id))


def completion_logprobs(lps: list[TokenLogprob], offsets: list[int], tok: _Tokens) -> dict:
    return {
        "tokens": [tok(lp.token_id) for lp in lps],
        "token_logprobs": [finite(lp.logprob) for lp in lps],
        "top_logprobs": [{tok(t): finite(v) for t, v in lp.top} for lp in lps],
        "text_offset": list(offsets),
    }


def chat_logprobs(lps: list[TokenLogprob], tok: _Tokens) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        s = tok(token_id)
        return {"token": s, "logprob": finite(logprob), "bytes": tok.bytes(token_id)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


# ---- /v1/completions -----------------------------------------------------------------------------------


@dataclass
class Echo:
    """A prompt as `echo` returns it: its text, its tokens' offsets in that text, its logprobs when asked."""

    text: str
    offsets: list[int]
    logprobs: list[TokenLogprob | None] | None = None


def _echo(state: ServerState, prompt: str | list[int], ids: list[int], tok: _Tokens) -> Echo:
    text = prompt if isinstance(prompt, str) else state.llm.tokenizer.decode(ids)
    try:
        offsets = token_char_offsets(state.llm.tokenizer, ids, text)[0]
    except RequestError:  # the text does not decode back from its tokens (normalised): offsets token by token
        offsets = list(itertools.accumulate((len(tok(t)) for t in ids[:-1]), initial=0))
    return Echo(text, offsets)


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """`prompt` as a list of prompts: a string and a token-id list are one prompt each."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


@dataclass
class CompletionInputs:
    prompts: list[list[int]]  # token ids of each prompt
    subs: list[Submission]  # n per prompt, prompt-major: choice index = prompt index * n + choice
    echoes: list[Echo] | None  # per prompt, with `echo`
    generate: bool  # False for `echo` with max_tokens 0: the one token run is not returned


def _completion_inputs(state: ServerState, body: CompletionRequest) -> CompletionInputs:
    check_model(body.model, state.model_name)
    check_n(body.n, state.settings)
    prompts = _prompt_list(body.prompt)
    if len(prompts) > 1 and len(prompts) * body.n > state.settings.max_waiting_requests:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more completions than the server queues "
                            f"({state.settings.max_waiting_requests}); send fewer at a time", param="prompt")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 only with echo: the prompt alone)", param="max_tokens")
    generate = body.max_tokens != 0
    requested = (body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS) or 1
    prompt_logprobs = body.logprobs if body.echo else None
    all_ids, subs = [], []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        ids = prompt_ids(state.llm, prompt, param)
        max_tokens = max_tokens_for(state.llm, len(ids), requested, prompt_param=param, body=body)
        all_ids.append(ids)
        subs += submissions(state.llm, state.settings, body, ids, n=body.n, max_tokens=max_tokens,
                            logprobs=body.logprobs if generate else None, prompt_logprobs=prompt_logprobs,
                            renames={"prompt": param})
    tok = _Tokens(state)
    echoes = [_echo(state, p, ids, tok) for p, ids in zip(prompts, all_ids)] if body.echo else None
    return CompletionInputs(all_ids, subs, echoes, generate)


class _CompletionChoices:
    """The choices of one /v1/completions request, and how each becomes JSON (whole or as stream deltas)."""

    def __init__(self, body: CompletionRequest, inputs: CompletionInputs, tok: _Tokens):
        self.inputs, self.tok, self.n = inputs, tok, body.n
        self.want_lp = body.logprobs is not None
        self.choices = [Choice() for _ in inputs.subs]
        self.echo_sent = [False] * len(inputs.subs)

    def add(self, i: int, out: RequestOutput) -> None:
        echo = self._echo(i)
        if echo is not None and echo.logprobs is None and out.prompt_logprobs is not None:
            echo.logprobs = out.prompt_logprobs
        if self.inputs.generate:
            self.choices[i].add(out)
        elif out.finished:
            self.choices[i].finish_reason = "length"  # max_tokens 0: the prompt alone
            self.choices[i].cached_tokens = out.num_cached_prompt_tokens

    def _echo(self, i: int) -> Echo | None:
        return self.inputs.echoes[i // self.n] if self.inputs.echoes is not None else None

    def json(self, i: int, text: str, start: int = 0, *, with_echo: bool = True) -> dict:
        """Choice i with `text`, and logprobs from its `start`-th generated token on; led by the prompt when
        `with_echo` (a stream's first event of the choice)."""
        c, echo = self.choices[i], self._echo(i)
        lp = None
        if self.want_lp:
            shift = len(echo.text) if echo is not None else 0  # offsets count from the start of the echoed prompt
            lp = completion_logprobs(c.logprobs[start:], [o + shift for o in c.offsets[start:]], self.tok)
            if echo is not None and with_echo:
                lp = _with_prompt(lp, echo, self.tok, self.inputs.prompts[i // self.n])
        if echo is not None and with_echo:
            text = echo.text + text
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}

    def usage(self) -> dict:
        return _usage(sum(len(ids) for ids in self.inputs.prompts), self.choices, self.n)


def _with_prompt(lp: dict, echo: Echo, tok: _Tokens, ids: list[int]) -> dict:
    """Completion logprobs led by the prompt's: its first token has none (null), as in OpenAI's echo."""
    plps = echo.logprobs or [None] * len(ids)
    return {
        "tokens": [tok(t) for t in ids] + lp["tokens"],
        "token_logprobs": [finite(p.logprob) if p else None for p in plps] + lp["token_logprobs"],
        "top_logprobs": [{tok(t): finite(v) for t, v in p.top} if p else None for p in plps] + lp["top_logprobs"],
        "text_offset": echo.offsets + lp["text_offset"],
    }


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = server_state(request)
    arrival = time.monotonic()
    inputs = await run_in_threadpool(_completion_inputs, state, body)  # tokenising stays off the event loop
    with request_errors():
        group = await state.loop().submit(inputs.subs, arrival)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    cc = _CompletionChoices(body, inputs, _Tokens(state))

    if not body.stream:
        await collect(group, request, cc.add)
        return {**meta, "choices": [cc.json(i, c.text) for i, c in enumerate(cc.choices)], "usage": cc.usage()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def on_output(i: int, out: RequestOutput) -> Iterator[str]:
        n_before = len(cc.choices[i].logprobs)
        cc.add(i, out)
        first, cc.echo_sent[i] = not cc.echo_sent[i], True
        text = out.new_text if inputs.generate else ""
        if text or out.finished or (cc.want_lp and out.new_logprobs) or (first and body.echo):
            yield sse({**meta, "choices": [cc.json(i, text, n_before, with_echo=first)], **extra})

    usage = {**meta, "choices": []} if include_usage else None
    return stream_response(_choice_events(group, [], on_output, usage, cc.usage, state.settings.sse_keepalive_s),
                           group)


# ---- /v1/chat/completions ------------------------------------------------------------------------------


@dataclass
class ChatInputs:
    ids: list[int]
    subs: list[Submission]
    renames: dict[str, str]
    tools: ToolRequest


def chat_tool_request(state: ServerState, body: ChatCompletionRequest) -> ToolRequest:
    tools = chat_tools(body.tools)
    named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
    choice = None if named is not None else body.tool_choice
    return tool_request(state.llm, tools, choice, named, body.parallel_tool_calls, CHAT_FIELDS)


def _chat_inputs(state: ServerState, body: ChatCompletionRequest) -> ChatInputs:
    check_model(body.model, state.model_name)
    check_n(body.n, state.settings)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    tools = chat_tool_request(state, body)
    ids = chat_prompt_ids(state.llm, body.messages, tools=tools.shown)
    mt_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = max_tokens_for(state.llm, len(ids), requested, prompt_param="messages", max_tokens_param=mt_param,
                                body=body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    renames = {"max_tokens": mt_param, "logprobs": "top_logprobs", "prompt": "messages"}
    subs = submissions(state.llm, state.settings, body, ids, n=body.n, max_tokens=max_tokens, logprobs=logprobs,
                       renames=renames, grammar=tools.grammar)
    return ChatInputs(ids, subs, renames, tools)


def _chat_message(c: Choice, tools: ToolRequest) -> dict:
    """The reply as chat completions' `message`: its calls under `tool_calls` (a call the token limit cut
    short is left out: only complete, valid calls reach the client)."""
    parser = tools.parser()
    if parser is None:
        return {"role": "assistant", "content": c.text}
    parser.feed(c.text)
    parser.finish()
    calls = [call_json(call) for call in parser.complete_calls]
    if not calls:
        return {"role": "assistant", "content": parser.content}
    return {"role": "assistant", "content": parser.content or None, "tool_calls": calls}


def _tool_deltas(events: list) -> list[dict]:
    """A tool-call parser's events as chat-completion-chunk deltas (OpenAI's: a call's first delta has its
    index, id, type and name; the next ones its arguments piece by piece)."""
    deltas = []
    for e in events:
        if isinstance(e, TextDelta):
            deltas.append({"content": e.text})
        elif isinstance(e, CallStarted):
            deltas.append({"tool_calls": [{"index": e.call.index, "id": e.call.id, "type": "function",
                                           "function": {"name": e.call.name, "arguments": ""}}]})
        elif isinstance(e, ArgumentsDelta) and e.text:
            deltas.append({"tool_calls": [{"index": e.call.index, "function": {"arguments": e.text}}]})
    return deltas


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    arrival = time.monotonic()
    inputs = await run_in_threadpool(_chat_inputs, state, body)
    with request_errors(inputs.renames):
        group = await state.loop().submit(inputs.subs, arrival)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tok = _Tokens(state)
    choices = [Choice() for _ in range(body.n)]
    tools, ids = inputs.tools, inputs.ids

    if not body.stream:
        await collect(group, request, lambda i, out: choices[i].add(out))
        replies = []
        for i, c in enumerate(choices):
            message = _chat_message(c, tools)
            reason = "tool_calls" if message.get("tool_calls") and c.finish_reason == "stop" else c.finish_reason
            replies.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(c.logprobs, tok) if body.logprobs else None,
                            "finish_reason": reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": replies, "usage": _usage(len(ids), choices)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    extra = {"usage": None} if include_usage else {}
    parsers = [tools.parser() for _ in range(body.n)]

    def make(i: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**chunk, "choices": [choice], **extra})

    def on_output(i: int, out: RequestOutput) -> Iterator[str]:
        c, parser = choices[i], parsers[i]
        n_before = len(c.logprobs)
        c.add(out)
        lps = chat_logprobs(c.logprobs[n_before:], tok) if body.logprobs and len(c.logprobs) > n_before else None
        if parser is None:
            deltas = [{"content": out.new_text}] if out.new_text or lps else []
        else:
            deltas = _tool_deltas(parser.feed(out.new_text) + (parser.finish() if out.finished else []))
            if lps and not deltas:
                deltas = [{"content": ""}]  # the logprobs of text held back (a call's tag in the making)
        for k, delta in enumerate(deltas):
            yield make(i, delta, lps if k == 0 else None)
        if out.finished:
            yield make(i, {}, None, finish_reason(parser, c.finish_reason))

    roles = [make(i, {"role": "assistant", "content": ""}) for i in range(body.n)]
    usage = {**chunk, "choices": []} if include_usage else None
    return stream_response(_choice_events(group, roles, on_output, usage, lambda: _usage(len(ids), choices),
                                          state.settings.sse_keepalive_s), group)


async def _choice_events(group, first: list[str], on_output, usage: dict | None, usage_of: Callable[[], dict],
                         keepalive_s: float) -> AsyncIterator[str]:
    """The SSE stream of a completion: `first`, then `on_output`'s events per output, then the usage chunk
    (when asked), then [DONE]; an engine failure becomes an error event, and the group is always closed."""
    try:
        for event in first:
            yield event
        async for item in outputs(group, keepalive_s):
            for event in on_output(*item) if item is not None else [SSE_KEEPALIVE]:
                yield event
        if usage is not None:
            yield sse({**usage, "usage": usage_of()})
    except EngineStepError as e:
        yield sse(error_body(str(e), "server_error"))
    finally:
        group.close()
    yield SSE_DONE


# ---- /v1/models ----------------------------------------------------------------------------------------


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kvmini",
            "max_model_len": state.llm.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(server_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = server_state(request)
    check_model(model_id, state.model_name)
    return _model_card(state)
