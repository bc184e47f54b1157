"""What attention capture costs, in one run: batch-1 decode with and without capture, through the library
and over HTTP, plus a batch where one request captures and the others do not.

The speed of this machine drifts by 10-30 % within minutes, more than the effects measured here, so the
library figures are paired: two sessions on the same prompt, one capturing and one not, take decode steps
in turn (greedy, one token each), and the ratio is the median of the step-pair ratios; tokens/s is 1 / the
median step. Batch: two engines decode the same 8 prompts in turn, in the second one request captures
every layer and head; the ratio is the aggregate speed's. HTTP: `kvmini serve` in a subprocess, `POST
/generate` streamed with and without attention, short requests alternated request by request; 1 / the
median gap between token events (paired only by request, so noisier). Writes bench/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DEFAULT_MODEL, english_text, load_average, machine, print_table, write_json,
)
from bench.serve import Server, decode_rate  # noqa: E402
from engine import LLM, AttentionCapture, SamplingParams, Span  # noqa: E402


def variants(num_layers: int, prompt_len: int) -> dict[str, AttentionCapture | None]:
    three = (num_layers // 6, num_layers // 2, num_layers - 1 - num_layers // 6)
    half = prompt_len // 2
    spans = (Span("first_half", 1, half), Span("second_half", half, prompt_len))
    return {
        "none": None,
        "all layers x heads, full rows": AttentionCapture(),
        "all, full rows + head stats": AttentionCapture(head_stats=True),
        "all, top-8": AttentionCapture(top_k=8),
        "all, 2 spans": AttentionCapture(spans=spans),
        "3 layers x 2 heads, full rows": AttentionCapture(layers=three, heads=(0, 1)),
        "3 x 2, top-8": AttentionCapture(layers=three, heads=(0, 1), top_k=8),
    }


def paired_session_steps(llm: LLM, prompt: list[int], n: int, capture) -> tuple[list[float], list[float]]:
    """Decode-step durations of two sessions on the same prompt, one without and one with `capture`,
    stepped in turn (which goes first alternates): each pair of steps is timed moments apart, so the
    drift of a shared machine cancels in their ratio."""
    plain, captured = [], []
    with llm.session(prompt) as a, llm.session(prompt, capture=capture) as b:
        a.step(), b.step()  # the prefills
        for i in range(n):
            for session, times in ((a, plain), (b, captured)) if i % 2 == 0 else ((b, captured), (a, plain)):
                start = time.perf_counter()
                session.step()
                times.append(time.perf_counter() - start)
    return plain, captured


def paired_batch_steps(pair: tuple[LLM, LLM], prompts: list[list[int]], n: int,
                       capture) -> tuple[list[float], list[float]]:
    """The same for two engines decoding the same batch of prompts, the second with its first request
    capturing: aggregate speed of a batch in which one request captures."""
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    engines = [llm.engine for llm in pair]
    for e, cap in zip(engines, (None, capture)):
        for i, p in enumerate(prompts):
            e.add_request(p, params, capture=cap if i == 0 else None)
        while any(not r.seq.output_ids for r in e.requests.values()):
            e.step()
    times: tuple[list[float], list[float]] = ([], [])
    i = 0
    while all(e.has_unfinished() for e in engines):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            engines[j].step()
            times[j].append(time.perf_counter() - start)
        i += 1
    for e in engines:
        while e.has_unfinished():
            e.step()
    return times


def rate(times: list[float], batch: int = 1) -> float:
    """Tokens per second from the median step: robust to the scheduling hiccups of a shared 2-core VM."""
    return batch / statistics.median(times)


def paired_ratio(plain: list[float], captured: list[float]) -> float:
    """Speed with capture / without: the median of the step-pair ratios."""
    return statistics.median(a / b for a, b in zip(plain, captured))


def generate_times(url: str, prompt: list[int], n: int, attention: dict | None) -> list[float]:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    if attention is not None:
        body["attention"] = attention
    times = []
    with httpx.stream("POST", url + "/generate", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if '"token_id"' in line[:20]:
                    times.append(now)
                elif json.loads(line[6:]).get("error"):
                    raise RuntimeError(line)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None, help="weights as in bench/decode.py (default: none)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per session pair and round")
    ap.add_argument("--repeats", type=int, default=8, help="rounds: every variant runs once per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--http-rounds", type=int, default=24, help="HTTP: requests per variant, alternated")
    ap.add_argument("--http-tokens", type=int, default=16, help="HTTP: tokens per request")
    ap.add_argument("--out", default="attention")
    args = ap.parse_args()

    load_before = load_average()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization)
    ids = llm.tokenizer.encode(english_text())
    prompt = ids[: args.prompt_tokens]
    caps = variants(llm.config.num_hidden_layers, len(prompt))
    n = args.new_tokens

    batch_prompts = [ids[i * 50 : i * 50 + args.prompt_tokens] for i in range(args.batch)]
    for cap in caps.values():  # warm up every path
        paired_session_steps(llm, prompt, 4, cap)
    pairs: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in caps if name != "none"}
    for _ in range(args.repeats):
        for name, cap in caps.items():
            if cap is not None:
                plain, captured = paired_session_steps(llm, prompt, n, cap)
                pairs[name][0].extend(plain)
                pairs[name][1].extend(captured)
    every_plain = [t for plain, _ in pairs.values() for t in plain]
    library = [{"capture": "none", "tok_s": rate(every_plain), "ratio": 1.0, "steps": len(every_plain)}]
    library += [{"capture": name, "tok_s": rate(captured), "ratio": paired_ratio(plain, captured),
                 "steps": len(captured)} for name, (plain, captured) in pairs.items()]
    second = LLM(args.model, dtype=args.dtype, quantization=args.quantization)
    batch_plain, batch_captured = [], []
    for _ in range(max(1, args.repeats // 4)):
        plain, captured = paired_batch_steps((llm, second), batch_prompts, 4 * n, AttentionCapture())
        batch_plain += plain
        batch_captured += captured
    batched = [{"batch": args.batch, "capture": "none", "tok_s": rate(batch_plain, args.batch), "ratio": 1.0},
               {"batch": args.batch, "capture": "one of them captures all", "tok_s": rate(batch_captured, args.batch),
                "ratio": paired_ratio(batch_plain, batch_captured)}]
    del second
    del llm

    http = []
    if not args.no_http:
        three = caps["3 layers x 2 heads, full rows"].layers
        bodies = {"none": None,
                  "3 x 2, top-8": {"layers": list(three), "heads": [0, 1], "top_k": 8, "head_stats": False},
                  "3 x 2, top-8 + head stats": {"layers": list(three), "heads": [0, 1], "top_k": 8},
                  "spans, every layer (head mean)": {"spans": [{"name": "a", "start": 1, "end": len(prompt) // 2}],
                                                     "head_stats": False}}
        extra = ["--dtype", args.dtype, "--quantization", args.quantization or "none"]
        with Server(args.model, extra) as server:
            for body in bodies.values():
                generate_times(server.url, prompt, 8, body)
            gaps: dict[str, list[float]] = {name: [] for name in bodies}
            rounds: dict[str, list[float]] = {name: [] for name in bodies}
            for _ in range(args.http_rounds):  # short requests, many rounds: drift hits every variant alike
                for name, body in bodies.items():
                    times = generate_times(server.url, prompt, args.http_tokens, body)
                    gaps[name] += [b - a for a, b in zip(times, times[1:])]
                    rounds[name].append(round(decode_rate(times), 2))
        hbase = rate(gaps["none"])
        http = [{"attention": name, "tok_s": rate(g), "ratio": rate(g) / hbase, "rounds": rounds[name]}
                for name, g in gaps.items()]

    load_after = load_average()
    print(f"load average {load_before:.2f} before, {load_after:.2f} after; {args.dtype}, "
          f"prompt {len(prompt)} tokens, {n} new")
    print_table(["library, batch 1", "tok/s", "x none"], [[r["capture"], r["tok_s"], r["ratio"]] for r in library])
    print_table([f"library, batch {args.batch}", "tok/s", "x none"],
                [[r["capture"], r["tok_s"], r["ratio"]] for r in batched])
    if http:
        print_table(["HTTP /generate, batch 1", "tok/s", "x none"], [[r["attention"], r["tok_s"], r["ratio"]]
                                                                     for r in http])
    path = write_json(args.out, {
        "machine": machine(), "load_average": {"before": load_before, "after": load_after},
        "dtype": args.dtype, "quantization": args.quantization, "prompt_tokens": len(prompt), "new_tokens": n,
        "repeats": args.repeats, "http_rounds": args.http_rounds, "http_tokens": args.http_tokens,
        "library": library, "batch": batched, "http": http,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
