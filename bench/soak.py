"""Soak test of the live HTTP server: many streaming clients, random early disconnects, a KV cache so
small that the scheduler preempts, for minutes; then checks that nothing broke and nothing leaked.

Starts `kvmini serve` as a subprocess on a free loopback port (the way a user runs it), with a tiny
`--kv-cache-memory` (default 4M: about a dozen 16-token blocks on the default model, so sequences get
preempted and recomputed). N clients (asyncio + httpx) loop for T seconds, each picking at random one of
    POST /v1/completions       stream=true                     final event: `data: [DONE]`
    POST /v1/chat/completions  stream=true                     final event: `data: [DONE]`
    POST /generate             SSE, attention top-4 of layer 0 head 0   final event: `"done": true`
with a random prompt (a slice of the Python language reference), 4..48 max_tokens, a random temperature
and seed; about 30 % of requests close the stream after a random number of events. When the time is up
the clients finish their current request (those still running after --drain seconds are cancelled).

Canaries (`CANARIES`: greedy and seeded, on every route, one capturing attention): each is sent alone
before the load, then `--canary-clients` more clients (default 2) send them over and over during it, each
read to the end; every
answer must equal its answer alone, event for event (token ids, text, logprobs, attention rows; ids,
timestamps and usage aside). That is the server's batch invariance (engine/model/invariance.py) under load.

SSE is parsed on "\\n" only (never `str.splitlines`, which also splits on U+2028 and friends inside the
generated text), one JSON payload per `data: ` line. A stream "without its final event" is one the server
closed before sending [DONE] / the done object; an `{"error": ...}` event is counted as an error event.

Then: KV blocks in use (`kvmini_kv_blocks_used` from GET /metrics once every client stopped; waits a few
seconds for it to reach 0), the server's RSS (VmRSS) after the warm-up (10 % of the run, at least 10 s)
and at the end, tokens/s (the server's `kvmini_generation_tokens_total` over the load phase), the load
average, the scheduler's preemptions (`kvmini_preemptions_total`), the server's other /metrics counters,
and its exit code after SIGTERM.

Exit status 1 when: any canary answered otherwise than alone, any 5xx, any stream without its final
event, any error event or unparsable event,
a stream that ended with [DONE] but no finish_reason, any transport error (connection reset, timeout),
KV blocks left in use, the server dying or not shutting down cleanly on SIGTERM, or (only with
--check-rss) RSS growth >= 10 %. The failing requests are printed verbatim (route and body). Writes
bench/results/soak.json (or --out); --server-log keeps the server's own output.

    python bench/soak.py                       # 64 clients, 5 minutes
    python bench/soak.py --clients 16 --duration 20 --check-rss
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, RESULTS, english_text, load_average, machine, print_table  # noqa: E402
from bench.serve import free_port  # noqa: E402

ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")
# Canaries: greedy and seeded requests on every route, one with attention capture, one with top logprobs.
# Each is sent alone before the load; during it one more client sends them again and again, read to the
# end. Batch invariance (engine/model/invariance.py) says every answer must be the same, event for event.
CANARIES = (
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}),
    ("/v1/completions", {"prompt": "Once upon a time, in a small village,", "max_tokens": 32, "temperature": 1.0,
                         "seed": 1234, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a haiku about the sea."}],
                              "max_tokens": 32, "temperature": 0.8, "seed": 7}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is 12 times 12?"}],
                              "max_tokens": 24, "temperature": 0}),
    ("/generate", {"prompt": "A B C A B C A B", "max_tokens": 16, "temperature": 0,
                   "attention": {"layers": [0, 29], "heads": [0, 4], "top_k": 4}}),
    ("/generate", {"prompt": "def fibonacci(n):\n    ", "max_tokens": 24, "temperature": 0.7, "seed": 99,
                   "logprobs": 2}),
)
VOLATILE = ("id", "created", "usage", "system_fingerprint")  # fields that may differ between two equal answers
ATTENTION = {"layers": [0], "heads": [0], "top_k": 4}
TEMPERATURES = (0.0, 0.5, 0.8, 1.0, 1.5)
RSS_LIMIT_PCT = 10.0
MAX_FAILURES_KEPT = 20  # failing requests kept verbatim in the report


@dataclass
class Counters:
    """What the clients saw, one outcome per request (plus the per-event anomalies)."""

    started: int = 0
    completed: int = 0  # read to the final event
    disconnected: int = 0  # closed by the client on purpose, before the final event
    cancelled_at_end: int = 0  # still running when the drain time ran out
    http_4xx: int = 0
    http_5xx: int = 0
    transport_errors: int = 0
    missing_final: int = 0  # the server ended the stream without its final event
    error_events: int = 0  # streams that carried an {"error": ...} event
    bad_events: int = 0  # `data:` lines that are not JSON (or [DONE])
    no_finish_reason: int = 0  # [DONE] seen, but no choice ever had a finish_reason
    events: int = 0  # `data:` events received, all streams
    by_route: dict[str, int] = field(default_factory=lambda: {r: 0 for r in ROUTES})
    statuses: dict[str, int] = field(default_factory=dict)  # HTTP status of every response
    failures: list[dict] = field(default_factory=list)  # the first few failing requests, verbatim

    def fail(self, kind: str, route: str, body: dict, detail: str) -> None:
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append({"kind": kind, "route": route, "body": body, "detail": detail[-2000:]})


# ---- requests --------------------------------------------------------------------------------------------


class Workload:
    """Random request bodies (prompt text, max_tokens, sampling) from one seeded RNG per client."""

    def __init__(self, text: str, seed: int, max_tokens: tuple[int, int], disconnect_rate: float):
        self.text = text
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.disconnect_rate = disconnect_rate

    def prompt(self) -> str:
        n = self.rng.randint(20, 200)  # characters, about 5..60 tokens
        start = self.rng.randrange(len(self.text) - n)
        return self.text[start : start + n]

    def request(self) -> tuple[str, dict, int | None]:
        """(route, body, disconnect after this many events or None to read to the end)."""
        rng = self.rng
        route = rng.choice(ROUTES)
        body: dict = {"max_tokens": rng.randint(*self.max_tokens), "temperature": rng.choice(TEMPERATURES),
                      "seed": rng.randrange(2**31)}
        if rng.random() < 0.2:
            body["stop"] = ["\n\n"]
        if route == "/v1/completions":
            body.update(prompt=self.prompt(), stream=True)
        elif route == "/v1/chat/completions":
            body.update(messages=[{"role": "user", "content": self.prompt()}], stream=True)
        else:
            body.update(prompt=self.prompt(), attention=ATTENTION)
            if rng.random() < 0.2:
                body["logprobs"] = 2
        if route != "/generate" and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        cut = rng.randint(1, body["max_tokens"] + 1) if rng.random() < self.disconnect_rate else None
        return route, body, cut


async def sse_events(response: httpx.Response):
    """The `data: ` payloads of an SSE response, split on b"\\n" only (UTF-8 never has 0x0A inside a character)."""
    buf = b""
    async for chunk in response.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.decode("utf-8").removesuffix("\r")
            if line.startswith("data: "):
                yield line[6:]
    if buf.startswith(b"data: "):
        yield buf.decode("utf-8")[6:]


async def one_request(client: httpx.AsyncClient, c: Counters, route: str, body: dict, cut: int | None) -> None:
    """Run one streamed request and count its outcome."""
    c.started += 1
    c.by_route[route] += 1
    final = finish_reason = had_error = False
    n = 0
    last = ""
    try:
        async with client.stream("POST", route, json=body) as r:
            c.statuses[str(r.status_code)] = c.statuses.get(str(r.status_code), 0) + 1
            if r.status_code >= 400:
                text = (await r.aread()).decode("utf-8", "replace")
                kind = "http_5xx" if r.status_code >= 500 else "http_4xx"
                setattr(c, kind, getattr(c, kind) + 1)
                c.fail(f"{kind} {r.status_code}", route, body, text)
                return
            async for data in sse_events(r):
                n += 1
                c.events += 1
                last = data
                if data == "[DONE]":
                    final = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    c.bad_events += 1
                    c.fail("bad_event", route, body, data)
                    continue
                if "error" in event:
                    c.error_events += 1
                    had_error = True
                    c.fail("error_event", route, body, data)
                    final = final or route == "/generate"
                elif event.get("done") is True:
                    final = True
                elif any(ch.get("finish_reason") for ch in event.get("choices") or ()):
                    finish_reason = True
                if final and route == "/generate":
                    break
                if cut is not None and n >= cut:
                    c.disconnected += 1
                    return  # leaving the `async with` closes the connection mid-stream
    except asyncio.CancelledError:
        c.cancelled_at_end += 1
        raise
    except (httpx.HTTPError, httpx.StreamError, UnicodeDecodeError) as e:
        c.transport_errors += 1
        c.fail("transport_error", route, body, f"{type(e).__name__}: {e} after {n} events")
        return
    if not final:
        c.missing_final += 1
        c.fail("missing_final", route, body, f"stream ended after {n} events; last: {last}")
        return
    if route != "/generate" and not finish_reason and not had_error:
        c.no_finish_reason += 1
        c.fail("no_finish_reason", route, body, f"[DONE] after {n} events without a finish_reason")
    c.completed += 1


async def client_loop(client: httpx.AsyncClient, c: Counters, work: Workload, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await one_request(client, c, *work.request())


# ---- canaries --------------------------------------------------------------------------------------------


async def answer(client: httpx.AsyncClient, route: str, body: dict) -> list:
    """A streamed answer as the list of its events, without the fields that may differ between equal ones
    (ids, timestamps, usage: a prefix-cache hit changes `cached_tokens`)."""
    events = []
    async with client.stream("POST", route, json={**body, "stream": True} if route != "/generate" else body) as r:
        if r.status_code != 200:
            return [f"HTTP {r.status_code}: {(await r.aread()).decode('utf-8', 'replace')}"]
        async for data in sse_events(r):
            if data == "[DONE]":
                break
            event = {k: v for k, v in json.loads(data).items() if k not in VOLATILE}
            if event:
                events.append(event)
            if event.get("done") is True:
                break
    return events


@dataclass
class Canaries:
    """Each canary's answer alone (`reference`), and how often it came back otherwise under load."""

    reference: list[list] = field(default_factory=list)
    sent: int = 0
    mismatched: int = 0
    mismatches: list[dict] = field(default_factory=list)  # the first few, with both texts


def answer_text(events: list) -> str:
    parts = []
    for e in events:
        if isinstance(e, str):
            return e
        for ch in e.get("choices") or ():
            parts.append(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
        if "token_id" in e:
            parts.append(e.get("text", ""))
    return "".join(parts)


async def canary_loop(client: httpx.AsyncClient, canaries: Canaries, stop: asyncio.Event, start: int = 0) -> None:
    i = start
    while not stop.is_set():
        route, body = CANARIES[i % len(CANARIES)]
        got = await answer(client, route, body)
        canaries.sent += 1
        if got != canaries.reference[i % len(CANARIES)]:
            canaries.mismatched += 1
            if len(canaries.mismatches) < MAX_FAILURES_KEPT:
                canaries.mismatches.append({"route": route, "body": body,
                                            "alone": answer_text(canaries.reference[i % len(CANARIES)]),
                                            "under_load": answer_text(got)})
        i += 1


# ---- the server ------------------------------------------------------------------------------------------


def start_server(model: Path, port: int, args: list[str], log, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, **(env or {})})


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy after {timeout_s} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM, then wait (SIGKILL if it hangs); its exit code (negative: killed by that signal)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def clean_exit(code: int, output: str) -> bool:
    """`kvmini serve` exits 0 after a SIGTERM drain (server/cli.py)."""
    return code == 0


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().split("\n"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """GET /metrics as {name{labels}: value} (histogram buckets left out)."""
    r = await client.get("/metrics", timeout=10)
    r.raise_for_status()
    out = {}
    for line in r.text.split("\n"):
        m = _METRIC.match(line)
        if m and "_bucket{" not in m.group(1):
            v = float(m.group(2))
            out[m.group(1)] = int(v) if v.is_integer() else v
    return out


async def settled_metrics(client: httpx.AsyncClient, wait_s: float) -> tuple[dict[str, float], float]:
    """/metrics once KV blocks used, running and waiting are all 0 (or after `wait_s`), and how long it took."""
    start = time.monotonic()
    while True:
        m = await metrics(client)
        idle = all(m.get(k, 0) == 0 for k in ("kvmini_kv_blocks_used", "kvmini_requests_running",
                                               "kvmini_requests_waiting"))
        if idle or time.monotonic() - start > wait_s:
            return m, time.monotonic() - start
        await asyncio.sleep(0.2)


# ---- the run ---------------------------------------------------------------------------------------------


async def sample_rss(pid: int, start: float, samples: list, every_s: float = 5.0) -> None:
    """(seconds since `start`, VmRSS MiB) every `every_s` until cancelled: growth that levels off is warm-up,
    growth that keeps its slope is a leak."""
    while True:
        samples.append((round(time.monotonic() - start, 1), rss_mib(pid)))
        await asyncio.sleep(every_s)


def warmup_s(duration_s: float) -> float:
    """RSS baseline time: 10 % of the run, at least 10 s, never past half of it."""
    return min(max(0.1 * duration_s, 10.0), duration_s / 2)


async def load_phase(url: str, pid: int, clients: int, duration_s: float, drain_s: float, seed: int,
                     max_tokens: tuple[int, int], disconnect_rate: float, settle_s: float,
                     canary_clients: int = 2) -> dict:
    text = english_text()
    c = Counters()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(connect=10, read=300, write=10, pool=60)
    canaries = Canaries()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        for route, body in CANARIES:  # alone: the server runs nothing else
            canaries.reference.append(await answer(client, route, body))
        before = await metrics(client)
        start = time.monotonic()
        samples: list[tuple[float, float | None]] = []
        sampler = asyncio.create_task(sample_rss(pid, start, samples))
        tasks = [asyncio.create_task(client_loop(client, c, Workload(text, seed + i, max_tokens, disconnect_rate),
                                                 stop)) for i in range(clients)]
        tasks += [asyncio.create_task(canary_loop(client, canaries, stop, start=i * len(CANARIES) // canary_clients))
                  for i in range(canary_clients)]
        await asyncio.sleep(warmup_s(duration_s))
        rss_warm = rss_mib(pid)
        await asyncio.sleep(max(0.0, duration_s - (time.monotonic() - start)))
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        load_s = time.monotonic() - start
        after, settle_wait = await settled_metrics(client, settle_s)
        rss_end = rss_mib(pid)
        sampler.cancel()
    tokens = after.get("kvmini_generation_tokens_total", 0) - before.get("kvmini_generation_tokens_total", 0)
    return {"counters": c, "canaries": canaries, "load_s": load_s, "metrics": after, "settle_wait_s": settle_wait,
            "rss_warm": rss_warm, "rss_end": rss_end, "rss_samples": samples, "tokens": tokens}


def run_soak(model_dir: Path | str = DEFAULT_MODEL, clients: int = 64, duration_s: float = 300, *,
             kv_cache_memory: str = "4M", max_num_seqs: int = 16, max_tokens: tuple[int, int] = (4, 48),
             disconnect_rate: float = 0.3, seed: int = 0, drain_s: float = 60, settle_s: float = 5,
             server_args: list[str] | None = None, server_env: dict[str, str] | None = None,
             server_log: Path | None = None, check_rss: bool = False, canary_clients: int = 2) -> dict:
    """Start the server, run the soak, stop the server; the report as a dict (see `main` for its use).

    `report["failures"]` lists why the run failed (empty: it passed); `report["counters"]` has the counts."""
    load_start = load_average()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--kv-cache-memory", kv_cache_memory, "--max-num-seqs", str(max_num_seqs), *(server_args or [])]
    log = open(server_log, "w+b") if server_log else tempfile.TemporaryFile()
    with log:
        proc = start_server(Path(model_dir), port, args, log, server_env)
        try:
            wait_healthy(proc, url)
            phase = asyncio.run(load_phase(url, proc.pid, clients, duration_s, drain_s, seed, max_tokens,
                                           disconnect_rate, settle_s, canary_clients))
            died = proc.poll() is not None
        finally:
            exit_code = stop_server(proc)
        log.seek(0)
        server_output = log.read().decode("utf-8", "replace")
    c: Counters = phase["counters"]
    m = phase["metrics"]
    warm, end = phase["rss_warm"], phase["rss_end"]
    growth = (end - warm) / warm * 100 if warm and end else None
    blocks_used = m.get("kvmini_kv_blocks_used")
    report = {
        "benchmark": "soak",
        "model": Path(model_dir).name,
        "clients": clients,
        "duration_s": duration_s,
        "load_phase_s": phase["load_s"],
        "server_args": args,
        "server_env": server_env or {},
        "seed": seed,
        "max_tokens": list(max_tokens),
        "disconnect_rate": disconnect_rate,
        "counters": {k: v for k, v in asdict(c).items() if k != "failures"},
        "failed_requests": c.failures,
        "canary_clients": canary_clients,
        "canaries_sent": phase["canaries"].sent,
        "canaries_mismatched": phase["canaries"].mismatched,
        "canary_mismatches": phase["canaries"].mismatches,
        "kv_blocks_used_end": blocks_used,
        "kv_blocks_settle_wait_s": phase["settle_wait_s"],
        "preemptions": m.get("kvmini_preemptions_total"),  # None: this server's /metrics has no such counter
        "server_metrics": {k: v for k, v in m.items() if not k.endswith(("_sum", "_count"))},
        "rss_mib_warm": warm,
        "rss_mib_end": end,
        "rss_growth_pct": growth,
        "rss_warmup_s": warmup_s(duration_s),
        "rss_mib_samples": phase["rss_samples"],
        "generated_tokens": phase["tokens"],
        "tokens_per_s": phase["tokens"] / phase["load_s"],
        "load_average_1m_start": load_start,
        "load_average_1m_end": os.getloadavg()[0],
        "server_exit_code": exit_code,
        "server_died_during_run": died,
        "server_tracebacks": server_output.count("Traceback"),
        "server_log_tail": [line for line in server_output.split("\n") if "Error" in line or "ERROR" in line][-20:],
        "machine": machine(),
    }
    reasons = []
    for key, label in (("http_5xx", "5xx responses"), ("missing_final", "streams without their final event"),
                       ("error_events", "error events"), ("bad_events", "unparsable events"),
                       ("no_finish_reason", "streams without a finish_reason"),
                       ("transport_errors", "transport errors")):
        if getattr(c, key):
            reasons.append(f"{getattr(c, key)} {label}")
    if phase["canaries"].mismatched:
        reasons.append(f"{phase['canaries'].mismatched} of {phase['canaries'].sent} canaries answered otherwise "
                       "than alone")
    if blocks_used != 0:
        reasons.append(f"{blocks_used} KV blocks still in use after {phase['settle_wait_s']:.1f} s idle")
    if died or not clean_exit(exit_code, server_output):
        reasons.append(f"server {'died during the run' if died else 'exited'} with code {exit_code}")
    if check_rss and (growth is None or growth >= RSS_LIMIT_PCT):
        reasons.append(f"RSS grew {growth:.1f} % (limit {RSS_LIMIT_PCT:.0f} %)" if growth is not None
                       else "RSS not measured")
    report["failures"] = reasons
    return report


def print_report(r: dict) -> None:
    c = r["counters"]
    print(f"{r['clients']} clients for {r['duration_s']:.0f} s (load phase {r['load_phase_s']:.1f} s); "
          f"server {' '.join(r['server_args'])}; load average {r['load_average_1m_start']:.2f} -> "
          f"{r['load_average_1m_end']:.2f}")
    rows = [[k, c[k]] for k in ("started", "completed", "disconnected", "cancelled_at_end", "http_4xx", "http_5xx",
                                "transport_errors", "missing_final", "error_events", "bad_events",
                                "no_finish_reason", "events")]
    rows += [[f"started {route}", n] for route, n in c["by_route"].items()]
    rows += [["canaries sent under load", r["canaries_sent"]],
             ["canaries answered otherwise than alone", r["canaries_mismatched"]],
             ["KV blocks used at the end", r["kv_blocks_used_end"]],
             ["preemptions (/metrics)", r["preemptions"] if r["preemptions"] is not None else "not exposed"],
             [f"RSS MiB after {r['rss_warmup_s']:.0f} s warm-up", r["rss_mib_warm"]],
             ["RSS MiB at the end", r["rss_mib_end"]],
             ["RSS growth %", r["rss_growth_pct"]],
             ["RSS MiB peak", max((v for _, v in r["rss_mib_samples"] if v), default=None)],
             ["generated tokens/s", r["tokens_per_s"]],
             ["server exit code", r["server_exit_code"]]]
    rows += [[k, v] for k, v in r["server_metrics"].items() if k.startswith("kvmini_requests_total")]
    print_table(["measure", "value"], rows)
    for f in r["failed_requests"]:
        print(f"FAILED REQUEST {f['kind']}: POST {f['route']} {json.dumps(f['body'], ensure_ascii=False)}\n"
              f"    {f['detail'][:500]}")
    for m in r["canary_mismatches"]:
        print(f"CANARY MISMATCH: POST {m['route']} {json.dumps(m['body'], ensure_ascii=False)}\n"
              f"    alone:      {m['alone'][:200]!r}\n    under load: {m['under_load'][:200]!r}")
    print("PASS" if not r["failures"] else "FAIL: " + "; ".join(r["failures"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300, help="seconds of load")
    ap.add_argument("--kv-cache-memory", default="4M", help="the server's --kv-cache-memory (small: preemption)")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--min-tokens", type=int, default=4, help="smallest max_tokens of a request")
    ap.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens of a request")
    ap.add_argument("--disconnect-rate", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drain", type=float, default=60, help="seconds the clients get to finish after the run")
    ap.add_argument("--check-rss", action="store_true", help=f"fail on RSS growth >= {RSS_LIMIT_PCT:.0f} %%")
    ap.add_argument("--canary-clients", type=int, default=2, help="clients that send only the canaries")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `kvmini serve` argument")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the server process only")
    ap.add_argument("--server-log", type=Path, help="keep the server's output in this file")
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = ap.parse_args()
    report = run_soak(args.model, args.clients, args.duration, kv_cache_memory=args.kv_cache_memory,
                      max_num_seqs=args.max_num_seqs, max_tokens=(args.min_tokens, args.max_tokens),
                      disconnect_rate=args.disconnect_rate, seed=args.seed, drain_s=args.drain,
                      server_args=args.server_arg, server_env=dict(e.split("=", 1) for e in args.server_env),
                      server_log=args.server_log, check_rss=args.check_rss, canary_clients=args.canary_clients)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
