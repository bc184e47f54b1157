"""The HTTP path against the library, in one run: batch-1 streamed decode and 16 concurrent streams.

Starts `kvmini serve` as a subprocess on a free loopback port (the way a user runs it) and streams
completions from it with a plain HTTP client; the same workload runs through `LLM` in this process,
alternating with the HTTP runs. Decode-only batch-1 speed excludes prefill: (tokens - 1) / (last token
time - first token time). The concurrent figure is aggregate output tokens / wall time from first
submit to last token, for both. Writes bench/results/serve.json.
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
from bench.common import DEFAULT_MODEL, english_text, load_average, machine, print_table, token_times, write_json  # noqa: E402
from engine.cli import DEFAULT_DTYPE, DEFAULT_QUANTIZATION  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kvmini serve` in a subprocess, stopped on exit."""

    def __init__(self, model: Path, extra: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model), "--port", str(self.port),
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})

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


def stream_times(url: str, prompt: list[int], max_tokens: int) -> tuple[list[float], int]:
    """Arrival times of the text events of one streamed completion (greedy, fixed length) and the number
    of tokens it generated (from its usage: a token that holds back its text sends no event)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["text"]:
                    times.append(now)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return times, tokens


def decode_rate(times: list[float], tokens: int | None = None) -> float:
    """Tokens per second after the first token (prefill excluded)."""
    return ((tokens or len(times)) - 1) / (times[-1] - times[0])


def concurrent_rate(url: str, prompts: list[list[int]], max_tokens: int) -> float:
    results: list[int] = [0] * len(prompts)

    def one(i: int) -> None:
        results[i] = stream_times(url, prompts[i], max_tokens)[1]

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / (time.perf_counter() - start)


class Library:
    """The same workload through `LLM` in this process (the server's idle engine thread sleeps meanwhile)."""

    def __init__(self, model: Path, dtype: str, quantization: str, threads: int | None):
        from engine import LLM

        self.llm = LLM(model, dtype=dtype, quantization=quantization, threads=threads)

    def token_times(self, prompt: list[int], max_tokens: int) -> list[float]:
        return token_times(self.llm, prompt, max_tokens)

    def concurrent_rate(self, prompts: list[list[int]], max_tokens: int) -> float:
        from engine import SamplingParams

        start = time.perf_counter()
        outs = self.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return sum(o.num_output_tokens for o in outs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default=DEFAULT_DTYPE)
    ap.add_argument("--quantization", default=DEFAULT_QUANTIZATION)
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own choice)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--concurrent-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `kvmini serve` argument")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the server process only")
    args = ap.parse_args()

    from engine.text.tokenizer import Tokenizer

    load = load_average()
    corpus = Tokenizer.from_dir(args.model).encode(english_text())
    prompt = corpus[: args.prompt_tokens]
    prompts = [corpus[i * 97 : i * 97 + args.prompt_tokens] for i in range(args.concurrent)]
    extra = ["--dtype", args.dtype, "--quantization", args.quantization, *args.server_arg]
    if args.threads is not None:
        extra += ["--threads", str(args.threads)]
    server_env = dict(item.split("=", 1) for item in args.server_env)
    library = Library(args.model, args.dtype, args.quantization, None)  # the library at its default
    lib_single, http_single, lib_many, http_many = [], [], [], []
    with Server(args.model, extra, server_env) as server:
        stream_times(server.url, prompt, 8)  # warm up both
        library.token_times(prompt, 8)
        # Library and HTTP alternate run by run, so slow phases of a shared machine hit both alike.
        for _ in range(args.repeats):
            lib_single.append(decode_rate(library.token_times(prompt, args.max_tokens)))
            http_single.append(decode_rate(*stream_times(server.url, prompt, args.max_tokens)))
        for _ in range(max(1, args.repeats // 2)):
            lib_many.append(library.concurrent_rate(prompts, args.concurrent_tokens))
            http_many.append(concurrent_rate(server.url, prompts, args.concurrent_tokens))
    hs, ls = statistics.median(http_single), statistics.median(lib_single)
    hm, lm = statistics.median(http_many), statistics.median(lib_many)
    rows = [["batch 1 streamed, decode tok/s", ls, hs, hs / ls],
            [f"{args.concurrent} streams, aggregate tok/s", lm, hm, hm / lm]]
    print(f"load average {load:.2f}; {args.dtype}, quantization {args.quantization}; "
          f"server threads {args.threads or 'default'}; prompt {args.prompt_tokens} tokens")
    print_table(["workload", "library", "HTTP", "HTTP / library"], rows)
    payload = {
        "benchmark": "serve",
        "model": args.model.name,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "server_threads": args.threads,
        "server_args": extra,
        "server_env": server_env,
        "load_average_1m": load,
        "batch1": {"max_tokens": args.max_tokens, "library_runs": lib_single, "http_runs": http_single,
                   "library_tokens_per_s": ls, "http_tokens_per_s": hs, "ratio": hs / ls},
        "concurrent": {"streams": args.concurrent, "max_tokens": args.concurrent_tokens,
                       "library_runs": lib_many, "http_runs": http_many,
                       "library_tokens_per_s": lm, "http_tokens_per_s": hm, "ratio": hm / lm},
        "machine": machine(),
    }
    print(f"wrote {write_json(os.environ.get('KVMINI_BENCH_NAME', 'serve'), payload)}")


if __name__ == "__main__":
    main()
