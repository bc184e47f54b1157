"""`ServerState`: everything a handler needs, held on `app.state.kvmini` (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from engine.api.llm import LLM
from server.engine_loop import EngineLoop
from server.errors import APIError
from server.metrics import Metrics
from server.settings import ServerSettings


@dataclass
class ServerState:
    llm: LLM
    settings: ServerSettings
    metrics: Metrics
    model_name: str
    created: int  # unix time the app was made (the model card's "created")
    engine_loop: EngineLoop | None = None  # set while the app is running (lifespan)

    def loop(self) -> EngineLoop:
        if self.engine_loop is None:
            raise APIError(503, "the engine loop is not running (start the app with its lifespan)")
        return self.engine_loop


def server_state(request: Request) -> ServerState:
    return request.app.state.kvmini
