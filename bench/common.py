"""Shared benchmark helpers: machine facts, memory bandwidth, timing, a fixed English prompt, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.core.paths import default_model_dir
from engine.kv_memory.quality import english_text  # noqa: F401  (the fixed text; bench scripts import it here)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = default_model_dir()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# Torch's OpenMP threads collapse when anything else runs on the cores: figures taken above this are wrong.
QUIET_LOAD = 0.5


def load_average() -> float:
    """The 1-minute load average, with a loud warning when the machine is too busy to time anything."""
    load = os.getloadavg()[0]
    if load > QUIET_LOAD:
        bar = "!" * 78
        print(f"{bar}\nWARNING: load average {load:.2f} > {QUIET_LOAD}: something else is running; "
              f"these figures are not trustworthy\n{bar}", file=sys.stderr, flush=True)
    return load


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth as a sum over a buffer far larger than the caches (best of `repeats`)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = min(timed(lambda: buf.sum().item()) for _ in range(repeats))
    return nbytes / best / 1e9


def token_times(llm, prompt: list[int], max_tokens: int, capture=None) -> list[float]:
    """Arrival time of every generated token of one greedy, fixed-length request through `LLMEngine`
    (per token, not per text delta: a token that holds back its text still counts), optionally capturing
    attention (`AttentionCapture`)."""
    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    rid = engine.add_request(prompt, params, capture=capture)
    times = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                times += [time.perf_counter()] * len(out.new_token_ids)
    return times


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def us_per_call(fn: Callable[[torch.Tensor], object], x: torch.Tensor, calls: int = 300, warmup: int = 20) -> float:
    """Mean µs of `fn(x)` over `calls` calls after `warmup` (inference mode: no autograd bookkeeping)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
    return (time.perf_counter() - start) / calls * 1e6


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
