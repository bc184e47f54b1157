"""Streaming plumbing shared by the endpoints: SSE / NDJSON framing, the streaming response (which
always closes its request group), and reading a group while watching for a client that left."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from server.engine_loop import EngineStepError, RequestGroup
from server.errors import APIError

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks whether its client is still there


# JSON leaves these raw inside strings, but they end a line for Python's str.splitlines (httpx's
# iter_lines) and for JavaScript's line terminators: escaped, one event stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj) -> str:
    """Compact JSON on one line, whatever the text holds (control characters are escaped by json itself)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).translate(_LINE_BREAKS)


def sse(obj) -> str:
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
# An SSE comment: clients ignore it, proxies and idle timeouts see the connection alive (a long prefill
# can keep the first token away for longer than a proxy waits).
SSE_KEEPALIVE = ": keep-alive\n\n"


def ndjson(obj) -> str:
    return dumps(obj) + "\n"


def finite(x: float) -> float:
    """JSON has no -inf: a token the sampler masked out reports -9999.0 (as vLLM does)."""
    return x if math.isfinite(x) else -9999.0


def stream_response(chunks: AsyncIterator[str], group: RequestGroup, media_type: str = "text/event-stream"):
    """Stream `chunks`; the group is closed (its unfinished requests aborted) when the stream ends,
    the client disconnects, or the body is never iterated at all."""

    async def close() -> None:
        group.close()

    return StreamingResponse(
        chunks,
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(close),
    )


class ClientGone(Exception):
    """The client disconnected while a non-streaming request was running."""


async def _next_or_poll(group: RequestGroup, timeout: float):
    """`group.next()` if it comes within `timeout`, else the sentinel `_TIMEOUT` (nothing is lost)."""
    task = asyncio.ensure_future(group.next())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:  # we are being cancelled: do not leave the reader behind
        task.cancel()
        raise
    if not done:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return _TIMEOUT
    return task.result()  # finished (possibly while being cancelled): keep its result


_TIMEOUT = object()


async def outputs(group: RequestGroup, keepalive_s: float | None = None) -> AsyncIterator[tuple | None]:
    """The group's (index, output) pairs until every member has finished; with `keepalive_s`, also None
    whenever that long passed without one (the caller sends a keep-alive). Nothing is lost on a timeout."""
    while True:
        item = await (group.next() if keepalive_s is None else _next_or_poll(group, keepalive_s))
        if item is None:
            return
        yield None if item is _TIMEOUT else item


async def collect(group: RequestGroup, request: Request, on_output) -> None:
    """Feed every (index, output) of a non-streaming request to `on_output`.

    Every `DISCONNECT_POLL_S` (whether or not outputs are flowing) it checks that the client is still
    connected; if not, the request is aborted at once (a response nobody reads is not worth computing)."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
        while True:
            item = await _next_or_poll(group, max(next_check - loop.time(), 0.0))
            if item is None:
                return
            if item is not _TIMEOUT:
                on_output(*item)
            if loop.time() >= next_check:
                if await request.is_disconnected():
                    raise ClientGone()
                next_check = loop.time() + DISCONNECT_POLL_S
    except ClientGone:
        raise APIError(499, "client disconnected") from None
    except EngineStepError as e:
        raise APIError(500, str(e)) from None
    finally:
        group.close()
