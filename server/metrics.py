"""Prometheus metrics, written by hand in the text exposition format (version 0.0.4); no dependency.

One `Metrics` object per app (on `app.state`), updated from the event-loop thread only.
Counters count engine requests (one per choice; `rejected` counts HTTP generation requests refused
before reaching the engine). Gauges come from the engine-loop's latest `LLMEngine.stats()` snapshot.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_STATUSES = ("finished", "aborted", "error", "rejected")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for bound, n in zip(self.buckets + (math.inf,), self.counts):
            cum += n
            out.append(f'{name}_bucket{{le="{_num(bound)}"}} {cum}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self) -> None:
        self.requests = {s: 0 for s in REQUEST_STATUSES}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        # Errors by kind: "400", "401", "413", "429", ... (HTTP answers), "engine:<Exception>" (a request
        # the engine ended), "shutdown" (ended by the shutdown timeout).
        self.errors: Counter[str] = Counter()

    def render(self, stats: dict[str, float]) -> str:
        lines: list[str] = []

        def block(name: str, kind: str, help_: str, body: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *body])

        block("kvmini_requests_total", "counter",
              "Requests by outcome (finished/aborted/error per engine request; rejected per HTTP request).",
              [f'kvmini_requests_total{{status="{s}"}} {n}' for s, n in self.requests.items()])
        block("kvmini_errors_total", "counter",
              "Errors by kind: HTTP status of refused requests, engine:<exception> for a request the engine "
              "ended, shutdown for requests cut by the shutdown timeout.",
              [f'kvmini_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())])
        block("kvmini_preemptions_total", "counter", "Running requests preempted (recomputed later) for KV blocks.",
              [f"kvmini_preemptions_total {_num(stats.get('preemptions', 0))}"])
        block("kvmini_spec_decode_num_drafts_total", "counter", "Speculative decoding: drafts verified.",
              [f"kvmini_spec_decode_num_drafts_total {_num(stats.get('spec_decode_num_drafts', 0))}"])
        block("kvmini_spec_decode_num_draft_tokens_total", "counter", "Speculative decoding: draft tokens verified.",
              [f"kvmini_spec_decode_num_draft_tokens_total {_num(stats.get('spec_decode_num_draft_tokens', 0))}"])
        block("kvmini_spec_decode_num_accepted_tokens_total", "counter",
              "Speculative decoding: draft tokens accepted (each one a step saved).",
              [f"kvmini_spec_decode_num_accepted_tokens_total "
               f"{_num(stats.get('spec_decode_num_accepted_tokens', 0))}"])
        block("kvmini_prompt_tokens_total", "counter", "Prompt tokens of requests admitted to the engine.",
              [f"kvmini_prompt_tokens_total {self.prompt_tokens}"])
        block("kvmini_generation_tokens_total", "counter", "Generated tokens.",
              [f"kvmini_generation_tokens_total {self.generation_tokens}"])
        block("kvmini_time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token.",
              self.ttft.lines("kvmini_time_to_first_token_seconds"))
        block("kvmini_inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a request.",
              self.itl.lines("kvmini_inter_token_latency_seconds"))
        gauges = (
            ("kvmini_requests_running", "running", "Requests the scheduler is running."),
            ("kvmini_requests_waiting", "waiting", "Requests queued in the scheduler (including preempted ones)."),
            ("kvmini_kv_blocks_used", "kv_blocks_used", "KV cache blocks held by sequences."),
            ("kvmini_kv_blocks_free", "kv_blocks_free", "KV cache blocks free (evictable prefix-cache ones included)."),
            ("kvmini_prefix_cache_hit_rate", "prefix_cache_hit_rate", "Prefix-cache hits / queries since start."),
        )
        for name, key, help_ in gauges:
            block(name, "gauge", help_, [f"{name} {_num(stats.get(key, 0))}"])
        return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    if isinstance(x, float):
        if math.isinf(x):
            return "+Inf" if x > 0 else "-Inf"
        if x.is_integer() and abs(x) < 1e15:
            return str(int(x))
        return repr(x)
    return str(x)
