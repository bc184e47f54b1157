"""ASGI middleware that guards every HTTP request before any handler runs: API key, then body size.

* API key: with `settings.api_key` set, every path except `/health` and `/` (the live page, which holds no
  data; its own requests carry the key the person types) needs
  `Authorization: Bearer <key>` (compared in constant time); otherwise 401 with `WWW-Authenticate`.
* Body size: bodies over `settings.max_request_bytes` get 413. The body is read here (a declared
  Content-Length over the limit is refused up front; chunked bodies are counted as they arrive) and
  handed on to the app unchanged. A refused body is drained up to `DRAIN_LIMIT` bytes first, so the
  client, still uploading, can read the 413 instead of seeing its connection reset.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_bytes
from server.settings import ServerSettings

OPEN_PATHS = frozenset({"/health", "/"})
DRAIN_LIMIT = 64 << 20


class GuardMiddleware:
    def __init__(self, app: ASGIApp, settings: ServerSettings, on_rejected: Callable[[str, int], None] | None = None):
        self.app = app
        self.settings = settings
        self.on_rejected = on_rejected
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await self._reject(scope, send, 401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", extra=[(b"www-authenticate", b"Bearer")])
            return

        limit = self.settings.max_request_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                await self._reject(scope, send, 400, "malformed Content-Length header")
                return
            if too_big:
                await self._drain(receive)
                await self._reject(scope, send, 413, f"request body is larger than {limit} bytes",
                                   code="request_too_large", close=True)
                return

        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._drain(receive, size)
                await self._reject(scope, send, 413, f"request body is larger than {limit} bytes",
                                   code="request_too_large", close=True)
                return
            body.append(chunk)
            more = message.get("more_body", False)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def _drain(self, receive: Receive, seen: int = 0) -> None:
        more = True
        while more and seen <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _reject(self, scope: Scope, send: Send, status: int, message: str, *, code: str | None = None,
                      extra: list[tuple[bytes, bytes]] | None = None, close: bool = False) -> None:
        if self.on_rejected is not None:
            self.on_rejected(scope["path"], status)
        body = error_bytes(status, message, code=code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += extra or []
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
