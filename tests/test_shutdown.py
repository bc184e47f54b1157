"""SIGTERM on `kvmini serve`: stop accepting, let running requests finish for up to --shutdown-timeout,
end the rest with a final error event, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

SHUTDOWN_TIMEOUT = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_events(resp: httpx.Response, into: list, first: threading.Event) -> None:
    buffer = ""
    for chunk in resp.iter_text():
        buffer += chunk
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            data = event.removeprefix("data: ")
            into.append(data if data == "[DONE]" else json.loads(data))
            first.set()


def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list, threading.Event]:
    events: list = []
    first = threading.Event()

    def run() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            assert resp.status_code == 200
            read_events(resp, events, first)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, events, first


def test_sigterm_drains_then_ends_the_rest_and_exits_0(smollm2_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--model", str(smollm2_dir), "--port", str(port),
         "--kv-cache-memory", "32M", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        # one request that cannot finish within the timeout, one that finishes while draining
        long_thread, long_events, long_first = stream_in_thread(
            url, {"prompt": "Count to a thousand:", "max_tokens": 1000, "ignore_eos": True, "temperature": 0})
        assert long_first.wait(60)
        short_thread, short_events, short_first = stream_in_thread(
            url, {"prompt": "Hi", "max_tokens": 20, "ignore_eos": True, "temperature": 0})
        assert short_first.wait(60)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        time.sleep(1.0)
        with pytest.raises(httpx.TransportError):  # no longer accepting connections
            httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)

        short_thread.join(60)
        assert short_events[-1] == "[DONE]" and not any("error" in e for e in short_events[:-1])
        assert short_events[-2]["choices"][0]["finish_reason"] == "length"

        long_thread.join(60)
        ended = time.monotonic() - sent
        errors = [e for e in long_events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1 and "shutting down" in errors[0]["error"]["message"], long_events[-3:]
        assert long_events[-1] == "[DONE]"
        assert SHUTDOWN_TIMEOUT - 0.5 < ended < SHUTDOWN_TIMEOUT + 10

        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
