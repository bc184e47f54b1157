"""`kvmini serve`: load a model and run the HTTP server with uvicorn (127.0.0.1 by default)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '1073741824', '512M', '2G', '1.5GiB', '64k' (binary units: K = 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 536870912, 512M, 2G)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return n


def parse_origins(text: str | None) -> tuple[str, ...]:
    """`--allowed-origins`: comma-separated (`http://localhost:3000,https://app.example`), or a JSON list
    as vLLM takes it (`'["*"]'`)."""
    if not text:
        return ()
    if text.lstrip().startswith("["):
        values = json.loads(text)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"--allowed-origins: a JSON list must hold strings, got {text!r}")
    else:
        values = text.split(",")
    return tuple(v.strip() for v in values if v.strip())


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted. `args` as `kvmini serve` parses them (engine/cli.py); those a
    caller may leave out (max_waiting_requests, served_model_name, max_model_len, log_level) take the same
    defaults. SIGTERM drains (see `DrainingServer`) and exits 0."""
    import torch

    from engine.cli import load_llm
    from engine.quant import describe
    from server.app import create_app
    from server.settings import ServerSettings

    api_key = args.api_key if args.api_key is not None else (os.environ.get("KVMINI_API_KEY") or None)
    settings = ServerSettings(
        api_key=api_key,
        max_waiting_requests=getattr(args, "max_waiting_requests", 256),
        model_name=getattr(args, "served_model_name", None),
        max_stop_strings=args.max_stop_strings,
        max_stop_length=args.max_stop_length,
        shutdown_timeout=args.shutdown_timeout,
        allowed_origins=parse_origins(getattr(args, "allowed_origins", None)),
    )
    kv_bytes = args.kv_cache_memory
    if isinstance(kv_bytes, str):
        kv_bytes = parse_size(kv_bytes)
    llm = load_llm(
        args,
        kv_cache_memory=kv_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=getattr(args, "max_model_len", None),
    )
    app = create_app(llm, settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    stats = llm.engine.stats()
    ranks = llm.engine_config.tensor_parallel_size
    print(f"kvmini: serving {app.state.kvmini.model_name} at http://{host}:{args.port}/v1 "
          f"({int(stats['kv_blocks_total'])} KV blocks of {llm.blocks.block_size} tokens"
          f"{_window_blocks(stats)}; "
          f"{str(llm.engine_config.dtype).removeprefix('torch.')}, KV cache {llm.kv_cache.kv_cache_dtype}, "
          f"linear layers: {describe(llm.model)}; {llm.batch_invariance}; {_speculative(llm)}; "
          f"{f'{ranks} tensor-parallel ranks of ' if ranks > 1 else ''}"
          f"{torch.get_num_threads()} threads{', API key required' if api_key else ''})", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=getattr(args, "log_level", "info"),
                            timeout_graceful_shutdown=settings.shutdown_timeout + SHUTDOWN_GRACE_S)
    server = DrainingServer(config, drain=lambda: app.state.kvmini.loop().drain(settings.shutdown_timeout))
    # uvicorn re-raises the signal it stopped on once it is done; handled here, SIGTERM then means exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        llm.close()  # the other tensor-parallel ranks, if any
    return 0


def _speculative(llm) -> str:
    spec = llm.engine_config.speculative
    return f"speculative: {spec.describe()}" if spec is not None else "no speculative decoding"


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


def _window_blocks(stats: dict) -> str:
    """Head-aware eviction: the window heads' pool beside the full heads' (engine/head_plan.py)."""
    n = stats.get("kv_window_blocks_total")
    return f" for the full-cache heads, {int(n)} for the window heads" if n is not None else ""
