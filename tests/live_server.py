"""`LiveServer`: a kvmini app served by uvicorn on a free loopback port, in a background thread
(shared by tests/test_server.py and tests/test_openapi.py)."""

from __future__ import annotations

import socket
import threading
import time


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.kvmini

    def on_engine_thread(self, fn):
        """Run fn() on the engine thread, serialised with the server's steps."""
        return self.state.engine_loop.run_sync(fn)
