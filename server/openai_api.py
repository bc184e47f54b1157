"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from engine.outputs import RequestOutput, TokenLogprob
from server.engine_loop import EngineStepError, Submission
from server.errors import APIError, error_body
from server.params import (
    chat_prompt_ids,
    check_model,
    check_n,
    max_tokens_for,
    prompt_ids,
    request_errors,
    submissions,
)
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.state import ServerState, server_state
from server.streaming import SSE_DONE, SSE_KEEPALIVE, collect, finite, outputs, sse, stream_response

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


def _usage(num_prompt: int, choices: list[Choice]) -> dict:
    """OpenAI's usage; `cached_tokens`: prompt tokens the first choice found in the prefix cache."""
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": num_prompt, "completion_tokens": completion, "total_tokens": num_prompt + completion,
            "prompt_tokens_details": {"cached_tokens": choices[0].cached_tokens}}


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


def _completion_inputs(state: ServerState, body: CompletionRequest) -> tuple[list[int], list[Submission]]:
    check_model(body.model, state.model_name)
    check_n(body.n, state.settings)
    ids = prompt_ids(state.llm, body.prompt)
    requested = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    max_tokens = max_tokens_for(state.llm, len(ids), requested, prompt_param="prompt")
    return ids, submissions(state.llm, state.settings, body, ids, n=body.n, max_tokens=max_tokens,
                            logprobs=body.logprobs)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = server_state(request)
    arrival = time.monotonic()
    ids, subs = await run_in_threadpool(_completion_inputs, state, body)  # tokenising stays off the event loop
    with request_errors():
        group = await state.loop().submit(subs, arrival)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    tok = _Tokens(state)
    choices = [Choice() for _ in range(body.n)]
    want_lp = body.logprobs is not None

    if not body.stream:
        await collect(group, request, lambda i, out: choices[i].add(out))
        return {
            **meta,
            "choices": [
                {"index": i, "text": c.text,
                 "logprobs": completion_logprobs(c.logprobs, c.offsets, tok) if want_lp else None,
                 "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ],
            "usage": _usage(len(ids), choices),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def on_output(i: int, out: RequestOutput) -> Iterator[str]:
        c = choices[i]
        n_before = len(c.logprobs)
        c.add(out)
        if not (out.new_text or out.finished or (want_lp and out.new_logprobs)):
            return
        lp = completion_logprobs(c.logprobs[n_before:], c.offsets[n_before:], tok) if want_lp else None
        choice = {"index": i, "text": out.new_text, "logprobs": lp, "finish_reason": c.finish_reason}
        yield sse({**meta, "choices": [choice], **extra})

    usage = {**meta, "choices": []} if include_usage else None
    return stream_response(_choice_events(group, [], on_output, usage, len(ids), choices,
                                          state.settings.sse_keepalive_s), group)


# ---- /v1/chat/completions ------------------------------------------------------------------------------


def _chat_inputs(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], list[Submission], dict]:
    check_model(body.model, state.model_name)
    check_n(body.n, state.settings)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    ids = chat_prompt_ids(state.llm, body.messages)
    mt_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = max_tokens_for(state.llm, len(ids), requested, prompt_param="messages", max_tokens_param=mt_param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    renames = {"max_tokens": mt_param, "logprobs": "top_logprobs", "prompt": "messages"}
    subs = submissions(state.llm, state.settings, body, ids, n=body.n, max_tokens=max_tokens, logprobs=logprobs,
                       renames=renames)
    return ids, subs, renames


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    arrival = time.monotonic()
    ids, subs, renames = await run_in_threadpool(_chat_inputs, state, body)
    with request_errors(renames):
        group = await state.loop().submit(subs, arrival)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tok = _Tokens(state)
    choices = [Choice() for _ in range(body.n)]

    if not body.stream:
        await collect(group, request, lambda i, out: choices[i].add(out))
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": chat_logprobs(c.logprobs, tok) if body.logprobs else None,
                 "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ],
            "usage": _usage(len(ids), choices),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    extra = {"usage": None} if include_usage else {}

    def make(i: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**chunk, "choices": [choice], **extra})

    def on_output(i: int, out: RequestOutput) -> Iterator[str]:
        c = choices[i]
        n_before = len(c.logprobs)
        c.add(out)
        lps = c.logprobs[n_before:]
        if out.new_text or (body.logprobs and lps):
            yield make(i, {"content": out.new_text}, chat_logprobs(lps, tok) if body.logprobs else None)
        if out.finished:
            yield make(i, {}, None, c.finish_reason)

    roles = [make(i, {"role": "assistant", "content": ""}) for i in range(body.n)]
    usage = {**chunk, "choices": []} if include_usage else None
    return stream_response(_choice_events(group, roles, on_output, usage, len(ids), choices,
                                          state.settings.sse_keepalive_s), group)


async def _choice_events(group, first: list[str], on_output, usage: dict | None, prompt_len: int,
                         choices: list[Choice], keepalive_s: float) -> AsyncIterator[str]:
    """The SSE stream of a completion: `first`, then `on_output`'s events per output, then the usage chunk
    (when asked), then [DONE]; an engine failure becomes an error event, and the group is always closed."""
    try:
        for event in first:
            yield event
        async for item in outputs(group, keepalive_s):
            for event in on_output(*item) if item is not None else [SSE_KEEPALIVE]:
                yield event
        if usage is not None:
            yield sse({**usage, "usage": _usage(prompt_len, choices)})
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
