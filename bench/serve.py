"""The HTTP path against the library, in one run: batch-1 streamed decode and 16 concurrent streams.

Starts `kvmini serve` as a subprocess on a free loopback port (the way a user runs it), streams
completions from it with a plain HTTP client, then stops it and runs the same workload through `LLM`
in this process. Decode-only batch-1 speed excludes prefill: (tokens - 1) / (last token time - first
token time). The concurrent figure is aggregate output tokens / wall time from first submit to last
token, for both. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, english_text, load_average, machine, print_table, write_json  # noqa: E402
from engine.cli import DEFAULT_DTYPE, DEFAULT_QUANTIZATION  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kvmini serve` in a subprocess, stopped on exit."""

    def __init__(self, model: Path, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model), "--port", str(self.port),
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream_times(url: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Arrival time of every token of one streamed completion (greedy, fixed length)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    times = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["text"] is not None:
                    times.append(now)
    return times


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def concurrent_rate(url: str, prompts: list[list[int]], max_tokens: int) -> float:
    results: list[int] = [0] * len(prompts)

    def one(i: int) -> None:
        results[i] = len(stream_times(url, prompts[i], max_tokens))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / (time.perf_counter() - start)


def library_rates(model: Path, dtype: str, quantization: str, threads: int | None, prompt: list[int], prompts: list[list[int]],
                  max_tokens: int, repeats: int) -> tuple[list[float], float]:
    from engine import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, quantization=quantization, threads=threads)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm up
    single = []
    for _ in range(repeats):
        times = []
        for _delta in llm.stream(prompt, params):
            times.append(time.perf_counter())
        single.append(decode_rate(times))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    aggregate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    return single, aggregate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default=DEFAULT_DTYPE)
    ap.add_argument("--quantization", default=DEFAULT_QUANTIZATION)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: kvmini's choice)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--concurrent-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `kvmini serve` argument")
    args = ap.parse_args()

    from engine.tokenizer import Tokenizer

    load = load_average()
    corpus = Tokenizer.from_dir(args.model).encode(english_text())
    prompt = corpus[: args.prompt_tokens]
    prompts = [corpus[i * 97 : i * 97 + args.prompt_tokens] for i in range(args.concurrent)]
    extra = ["--dtype", args.dtype, "--quantization", args.quantization, *args.server_arg]
    if args.threads is not None:
        extra += ["--threads", str(args.threads)]
    with Server(args.model, extra) as server:
        stream_times(server.url, prompt, 8)  # warm up
        http_single = [decode_rate(stream_times(server.url, prompt, args.max_tokens)) for _ in range(args.repeats)]
        http_many = concurrent_rate(server.url, prompts, args.concurrent_tokens)
    lib_single, lib_many = library_rates(args.model, args.dtype, args.quantization, args.threads, prompt, prompts,
                                         args.concurrent_tokens, args.repeats)
    hs, ls = statistics.median(http_single), statistics.median(lib_single)
    rows = [["batch 1 streamed, decode tok/s", ls, hs, hs / ls],
            [f"{args.concurrent} streams, aggregate tok/s", lib_many, http_many, http_many / lib_many]]
    print(f"load average {load:.2f}; {args.dtype}, quantization {args.quantization}; "
          f"threads {args.threads or 'default'}; prompt {args.prompt_tokens} tokens")
    print_table(["workload", "library", "HTTP", "HTTP / library"], rows)
    payload = {
        "benchmark": "serve",
        "model": args.model.name,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "threads": args.threads,
        "server_args": extra,
        "load_average_1m": load,
        "batch1": {"max_tokens": args.max_tokens, "library_runs": lib_single, "http_runs": http_single,
                   "library_tokens_per_s": ls, "http_tokens_per_s": hs, "ratio": hs / ls},
        "concurrent": {"streams": args.concurrent, "max_tokens": args.concurrent_tokens,
                       "library_tokens_per_s": lib_many, "http_tokens_per_s": http_many,
                       "ratio": http_many / lib_many},
        "machine": machine(),
    }
    print(f"wrote {write_json(os.environ.get('KVMINI_BENCH_NAME', 'serve'), payload)}")


if __name__ == "__main__":
    main()
