"""uvicorn's server with a drain: the first SIGTERM/SIGINT also ends the engine loop's requests in time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import FrameType

import uvicorn

# After the shutdown timeout has ended the last streams, how long uvicorn still waits for them to close.
SHUTDOWN_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM/SIGINT also starts the engine loop's drain: uvicorn stops
    accepting connections and waits for the open ones, the loop refuses new requests and ends what still
    runs after the shutdown timeout with a final error event (uvicorn alone would wait forever)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:  # a signal handler runs between bytecodes of the loop's thread: schedule, don't run here
            asyncio.get_event_loop().call_soon_threadsafe(self._drain)
