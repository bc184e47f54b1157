"""`kvmini serve`: load a model and run the HTTP server with uvicorn (127.0.0.1 by default). FastAPI and
uvicorn are imported only to serve: `kvmini` builds every subcommand's parser from this module."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
from pathlib import Path

from engine.cache.pools import DEFAULT_KV_CACHE_MEMORY
from engine.cli import HelpFormatter, add_model_args, load_llm, one_of, version_string
from engine.core.paths import require_default_model
from engine.sched.scheduler import SchedulerConfig

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


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """`kvmini serve` (engine/cli.py names this module in its PLUGIN_MODULES)."""
    s = sub.add_parser("serve", help="run the HTTP server (OpenAI-compatible API plus /generate)",
                       description="Serve MODEL (an HF-format directory; default: the imported SmolLM2) over HTTP: "
                                   "the OpenAI-compatible API plus /generate, on 127.0.0.1 unless --host says "
                                   "otherwise. Like `vllm serve MODEL`.", formatter_class=HelpFormatter)
    s.add_argument("model_positional", nargs="?", type=Path, metavar="MODEL",
                   help="HF-format model directory (the same as --model)")
    add_model_args(s)
    s.add_argument("--version", action="version", version=version_string())
    s.add_argument("--host", default="127.0.0.1", help="address to bind (this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $KVMINI_API_KEY, else none)")
    s.add_argument("--served-model-name", help="the model id of /v1/models and responses (default: the model "
                                               "directory's name)")
    s.add_argument("--max-model-len", type=int, help="context length in tokens (default: the model's "
                                                     "max_position_embeddings)")
    s.add_argument("--kv-cache-memory", default=f"{DEFAULT_KV_CACHE_MEMORY >> 20}M",
                   help="KV cache size: bytes, or with a suffix like 512M, 2G")
    s.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="most sequences decoded together")
    s.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens,
                   help="most tokens in one step (prefill chunks and decode rows)")
    s.add_argument("--max-waiting-requests", type=int, default=256,
                   help="queued requests beyond which new ones get 429")
    s.add_argument("--allowed-origins", help="origins a browser page may call the API from (CORS): comma-separated, "
                                             "or a JSON list as vLLM takes it; '*' for any (default: none)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are ended (default: 30)")
    s.add_argument("--max-stop-strings", type=int, default=16, help="most stop strings per request (default: 16)")
    s.add_argument("--max-stop-length", type=int, default=256,
                   help="most characters per stop string (default: 256)")
    s.set_defaults(func=_serve, runs_model=True)


def _serve(args: argparse.Namespace) -> int:
    args.model = one_of("model", args.model_positional, args.model) or require_default_model()
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted. `args` as `kvmini serve` parses them (engine/cli.py); those a
    caller may leave out (max_waiting_requests, served_model_name, max_model_len, log_level) take the same
    defaults. SIGTERM drains (see `DrainingServer`) and exits 0."""
    import torch
    import uvicorn

    from engine.model.quant import describe
    from server.app import create_app
    from server.draining import SHUTDOWN_GRACE_S, DrainingServer
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


def _window_blocks(stats: dict) -> str:
    """Head-aware eviction: the window heads' pool beside the full heads' (engine/cache/head_plan.py)."""
    n = stats.get("kv_window_blocks_total")
    return f" for the full-cache heads, {int(n)} for the window heads" if n is not None else ""
