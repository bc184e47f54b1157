"""kvmini's own endpoints: /generate (token-level stream, optionally with attention), /tokenize, /detokenize.

`POST /generate` streams one JSON object per generated token (SSE `data: {...}` events by default, or
NDJSON lines with `"format": "ndjson"`), then a final `{"done": true, ...}` object; there is no
`[DONE]` sentinel. `"stream": false` returns one JSON object with every token event under "tokens".

Token event:
    {"token_id", "text" (the text this token released; may be "" while a stop string or a partial
     character is held back), "logprob", "top_logprobs" (only if `logprobs` was given:
     [{"token_id", "token", "logprob"}]), "position" (absolute position of the new token),
     "attention" (only if asked, see below)}
Attention of the query that produced the token (its position is `position - 1`), per captured layer:
    full rows: {"query_position", "heads", "key_positions": [0..query_position],
                "key_token_ids": [...same length...], "layers": {"<layer>": [[p per key] per head]}}
    top_k:     {"query_position", "heads",
                "layers": {"<layer>": {"positions": [[k] per head], "probs": [[k] per head],
                                       "key_token_ids": [[k] per head], "leftover": [per head]}}}
    and, when asked: "spans": {"columns": [span names..., "generated", "rest_of_prompt"],
                               "layers": {"<layer>": [mass per column] (heads averaged when `heads`
                                          was omitted) or [[mass per column] per head]}},
    "scores" / "value_norms": {"<layer>": [[value per key] per head]}, and on the first event
    "prefill_matrix": {"<layer>": [[[p per key] per prompt query] per head]}.
Final event: {"done": true, "finish_reason", "stop_reason", "text", "token_ids", "usage" (as OpenAI's, with
prompt_tokens_details.cached_tokens)}, plus
"attention_heads": [{"layer", "head", "label", "secondary", "score", "scores", "detail"}] for every
captured head when attention was asked (unless "head_stats": false), over the generated tokens' rows
(and the prompt's, with "prefill_matrix": true); labels in docs/ATTENTION.md. With "head_stats_every": n, every
n-th token's event carries "attention_heads" too: the same, over the rows so far.
An engine failure mid-stream ends the stream with {"error": {...}}.
"""

from __future__ import annotations

import math
import time
import uuid

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from engine.capture.head_labels import label_heads
from engine.core.checks import check_text, check_token_ids
from engine.core.outputs import AttentionRows, RequestOutput
from server.engine_loop import EngineStepError, Submission
from server.errors import APIError, error_body
from server.params import (
    attention_capture,
    chat_prompt_ids,
    check_model,
    max_tokens_for,
    prompt_ids,
    request_errors,
    submissions,
)
from server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest
from server.state import ServerState, server_state
from server.streaming import SSE_KEEPALIVE, collect, finite, ndjson, outputs, sse, stream_response
from server.tools import chat_tools

router = APIRouter()

GENERATE_DEFAULT_MAX_TOKENS = 16


def _one_prompt(llm, body) -> tuple[list[int], str]:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    if body.prompt is not None:
        return prompt_ids(llm, body.prompt), "prompt"
    return chat_prompt_ids(llm, body.messages), "messages"


def _generate_inputs(state: ServerState, body: GenerateRequest) -> tuple[list[int], Submission, dict]:
    llm = state.llm
    check_model(body.model, state.model_name)
    ids, prompt_param = _one_prompt(llm, body)
    requested = body.max_tokens if body.max_tokens is not None else GENERATE_DEFAULT_MAX_TOKENS
    max_tokens = max_tokens_for(llm, len(ids), requested, prompt_param=prompt_param, body=body)
    text = body.prompt if isinstance(body.prompt, str) else None
    capture = attention_capture(body.attention, llm, state.settings, ids, max_tokens, text) if body.attention else None
    # The chosen token's logprob is always reported; top alternatives only when asked.
    logprobs = body.logprobs if body.logprobs is not None else 0
    renames = {"prompt": prompt_param}
    [sub] = submissions(llm, state.settings, body, ids, n=1, max_tokens=max_tokens, logprobs=logprobs,
                        renames=renames, capture=capture)
    return ids, sub, renames


def attention_json(rows: AttentionRows, all_ids: list[int], head_mean: bool) -> dict:
    """One token's attention event (module docstring); `head_mean`: spans averaged over the heads."""
    q = rows.query_position
    out: dict = {"query_position": q, "heads": list(rows.heads)}
    if rows.layers:
        out["key_positions"] = list(range(q + 1))
        out["key_token_ids"] = all_ids[: q + 1]
        out["layers"] = {str(layer): r.tolist() for layer, r in rows.layers.items()}
    elif rows.top is not None:
        out["layers"] = {
            str(layer): {
                "positions": t.positions.tolist(),
                "probs": t.probs.tolist(),
                "key_token_ids": [[all_ids[p] for p in head] for head in t.positions.tolist()],
                "leftover": t.leftover.tolist(),
            }
            for layer, t in rows.top.items()
        }
    if rows.spans is not None:
        masses = rows.spans.head_mean() if head_mean else rows.spans.layers
        out["spans"] = {"columns": list(rows.spans.columns),
                        "layers": {str(layer): m.tolist() for layer, m in masses.items()}}
    for name in ("scores", "value_norms"):
        extra = getattr(rows, name)
        if extra is not None:  # -inf (a pre-softmax score past the query) is not JSON: null
            out[name] = {str(layer): [[finite(x) for x in head] for head in r.tolist()] for layer, r in extra.items()}
    if rows.prefill is not None:
        out["prefill_matrix"] = {str(layer): m.tolist() for layer, m in rows.prefill.items()}
    return out


def head_stats_json(stats) -> list[dict]:
    """Every captured head's scores and labels (engine/capture/head_stats.py, docs/ATTENTION.md)."""
    return [
        {"layer": lab.layer, "head": lab.head, "label": lab.label, "secondary": lab.secondary,
         "score": _number(lab.score), "scores": {k: _number(v) for k, v in lab.scores.items()},
         "detail": _plain(lab.detail)}
        for lab in label_heads(stats)
    ]


def _plain(value):
    """numpy scalars and arrays inside a label's detail as JSON values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float):
        return _number(value)
    return value


def _number(x: float) -> float | None:
    """A score with no rows to count (NaN) is null."""
    x = float(x)
    return x if math.isfinite(x) else None


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    state = server_state(request)
    arrival = time.monotonic()
    llm = state.llm
    ids, sub, renames = await run_in_threadpool(_generate_inputs, state, body)  # off the event loop
    with request_errors(renames):
        group = await state.loop().submit([sub], arrival)
    head_mean = body.attention is not None and body.attention.heads is None
    want_top = body.logprobs is not None
    tokenizer = llm.tokenizer
    request_id = f"gen-{uuid.uuid4().hex}"

    def token_event(out: RequestOutput) -> dict:
        token = out.new_token_ids[0]
        ev = {"token_id": token, "text": out.new_text}
        lp = out.new_logprobs[0] if out.new_logprobs else None
        ev["logprob"] = finite(lp.logprob) if lp is not None else None
        if want_top:
            ev["top_logprobs"] = [{"token_id": t, "token": tokenizer.decode([t]), "logprob": finite(v)}
                                  for t, v in (lp.top if lp is not None else [])]
        ev["position"] = len(out.prompt_token_ids) + out.num_output_tokens - 1
        if out.attention:
            ev["attention"] = attention_json(out.attention[0], out.prompt_token_ids + out.token_ids, head_mean)
        return ev

    def final_event(out: RequestOutput) -> dict:
        n = len(out.token_ids)
        ev = {"done": True, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason, "text": out.text,
              "token_ids": list(out.token_ids),
              "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                        "prompt_tokens_details": {"cached_tokens": out.num_cached_prompt_tokens}}}
        if out.head_stats is not None and out.head_stats.n_rows:
            ev["attention_heads"] = head_stats_json(out.head_stats)
        return ev

    if not body.stream:
        events: list[dict] = []
        final: list[RequestOutput] = []

        def on_output(_: int, out: RequestOutput) -> None:
            if out.new_token_ids:
                events.append(token_event(out))
                if out.head_stats_snapshot is not None:
                    events[-1]["attention_heads"] = head_stats_json(out.head_stats_snapshot)
            if out.finished:
                final.append(out)

        await collect(group, request, on_output)
        return {"id": request_id, "object": "generation", "created": int(time.time()), "model": state.model_name,
                "tokens": events, **final_event(final[0])}

    frame = sse if body.format == "sse" else ndjson

    async def stream():
        keepalive = state.settings.sse_keepalive_s if body.format == "sse" else None  # NDJSON has no comments
        try:
            async for item in outputs(group, keepalive):
                if item is None:
                    yield SSE_KEEPALIVE
                    continue
                _, out = item
                if out.new_token_ids:
                    ev = token_event(out)
                    if out.head_stats_snapshot is not None:  # labelled off the event loop (a few ms for 270 heads)
                        ev["attention_heads"] = await run_in_threadpool(head_stats_json, out.head_stats_snapshot)
                    yield frame(ev)
                if out.finished:
                    yield frame(final_event(out))
        except EngineStepError as e:
            yield frame(error_body(str(e), "server_error"))
        finally:
            group.close()

    media = "text/event-stream" if body.format == "sse" else "application/x-ndjson"
    return stream_response(stream(), group, media)


def _tokenize(state: ServerState, body: TokenizeRequest) -> list[int]:
    check_model(body.model, state.model_name)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    if body.tools and body.messages is None:
        raise APIError(400, "tools need messages (the chat prompt that shows them)", param="tools")
    if body.prompt is not None:
        with request_errors():
            return state.llm.tokenizer.encode(check_text("prompt", body.prompt),
                                              add_special_tokens=body.add_special_tokens)
    return chat_prompt_ids(state.llm, body.messages, tools=chat_tools(body.tools))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = server_state(request)
    tokens = await run_in_threadpool(_tokenize, state, body)
    out = {"tokens": tokens, "count": len(tokens), "max_model_len": state.llm.max_model_len}
    if body.return_token_texts:
        decode = state.llm.tokenizer.decode
        out["token_texts"] = await run_in_threadpool(lambda: [decode([t], False) for t in tokens])
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = server_state(request)
    check_model(body.model, state.model_name)
    with request_errors():
        tokens = check_token_ids("tokens", body.tokens, state.llm.config.vocab_size)
    text = await run_in_threadpool(state.llm.tokenizer.decode, tokens, body.skip_special_tokens)
    return {"prompt": text}
