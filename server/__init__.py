"""kvmini's HTTP server: OpenAI-compatible and native endpoints over one continuously batched engine.

`create_app` and `ServerSettings` load on first use: `kvmini` imports server/cli.py to build its `serve`
parser, and a `kvmini generate` should not pay for FastAPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.app import create_app
    from server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from server.app import create_app

        return create_app
    if name == "ServerSettings":
        from server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'server' has no attribute {name!r}")
