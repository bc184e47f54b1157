"""`create_app(llm, settings)`: the FastAPI app. All state lives on `app.state.kvmini` (a `ServerState`).

Routes: POST /v1/completions, POST /v1/chat/completions, POST /v1/responses, GET /v1/models[/{id}]
(OpenAI-compatible),
POST /generate, POST /tokenize, POST /detokenize (kvmini's own), GET /health, GET /metrics, and GET / (the
live page, server/page.py).
The engine loop (one background task driving `llm.engine` on one worker thread) runs for the
lifetime of the app (its lifespan); one app per `LLM` at a time, since the engine is not thread-safe.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.middleware.cors import CORSMiddleware

from engine.api.llm import LLM
from server import native_api, openai_api, responses_api
from server.engine_loop import EngineLoop
from server.errors import APIError, install_handlers
from server.metrics import Metrics
from server.middleware import GuardMiddleware
from server.openapi import install_openapi
from server.page import install_page
from server.settings import ServerSettings
from server.state import ServerState, server_state

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/generate"})
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(llm: LLM, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(
        llm=llm,
        settings=settings,
        metrics=Metrics(),
        model_name=settings.model_name or llm.model_dir.name,
        created=int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = EngineLoop(llm, state.metrics, settings.max_waiting_requests)
        await loop.start()
        state.engine_loop = loop
        try:
            yield
        finally:
            state.engine_loop = None
            await loop.stop()

    app = FastAPI(title="kvmini", version="0.1.0", lifespan=lifespan)
    app.state.kvmini = state

    def on_rejected(path: str, status: int) -> None:
        state.metrics.errors[str(status)] += 1
        if path in GENERATION_PATHS and status < 500:
            state.metrics.requests["rejected"] += 1

    install_handlers(app, on_rejected)
    app.add_middleware(GuardMiddleware, settings=settings, on_rejected=on_rejected)
    if settings.allowed_origins:
        # Outside the guard (added last, so it runs first): a browser's preflight (OPTIONS, no credentials)
        # is answered here and never meets the API key; real requests still need it.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(native_api.router)

    @app.get("/health")
    async def health():
        if llm.failure is not None:  # e.g. a tensor-parallel rank exited: every request would fail
            raise APIError(503, llm.failure, code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        st = server_state(request)
        stats = st.engine_loop.stats if st.engine_loop is not None else llm.engine.stats()
        return PlainTextResponse(st.metrics.render(stats), media_type=PROMETHEUS_CONTENT_TYPE)

    install_page(app)  # GET /: the live page, a client of the routes above (server/page.py)
    install_openapi(app, state)  # /openapi.json tells the real statuses, streams and limits (server/openapi.py)
    return app
