"""`ServerSettings`: every knob of the HTTP server (the engine's own knobs live on `LLM`)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Limits and identity of one server instance.

    api_key: when set, every route except `GET /health` and `GET /` (the live page, which holds no data) needs
        `Authorization: Bearer <api_key>`.
    max_waiting_requests: a generation request is refused with 429 when accepting it would leave more
        than this many requests queued (accepted but not yet admitted by the scheduler); 0 refuses all.
    max_attention_values: the most attention floats one request may stream in total (see
        `server/params.py:attention_values` for how a request is counted); larger requests get 400.
    max_attention_top_k: the largest `attention.top_k` a request may ask for.
    max_request_bytes: request bodies larger than this get 413.
    model_name: the id served in `/v1/models` and echoed in responses; None = the model directory's name.
    max_n: the largest `n` (choices per request).
    max_stop_strings, max_stop_length: caps on a request's `stop` strings (each is checked against every
        new token's text on the engine thread, so an unbounded list slows every other request).
    shutdown_timeout: seconds running requests get to finish after SIGTERM before they are ended.
    sse_keepalive_s: an SSE stream that has sent nothing for this long (a long prefill) sends a comment,
        `: keep-alive`, so proxies and client timeouts see it alive.
    allowed_origins: origins a browser page may call the API from (CORS; "*" for any); empty = none, and no
        CORS headers at all. Preflight requests are answered without the API key; real ones need it.
    """

    api_key: str | None = None
    max_waiting_requests: int = 256
    max_attention_values: int = 2_000_000
    max_attention_top_k: int = 64
    max_request_bytes: int = 1 << 20
    model_name: str | None = None
    max_n: int = 8
    max_stop_strings: int = 16
    max_stop_length: int = 256
    shutdown_timeout: float = 30.0
    allowed_origins: tuple[str, ...] = ()
    sse_keepalive_s: float = 15.0

    def __post_init__(self) -> None:
        for name in ("max_waiting_requests",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.sse_keepalive_s > 0:
            raise ValueError(f"sse_keepalive_s must be > 0 seconds, got {self.sse_keepalive_s}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        for name in ("max_attention_values", "max_attention_top_k", "max_request_bytes", "max_n", "max_stop_strings",
                     "max_stop_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for origin in self.allowed_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"allowed origin {origin!r} is not '*' or scheme://host[:port] (no path)")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
