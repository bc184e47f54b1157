"""What attention capture costs, in one run: batch-1 decode with and without capture, through the library
and over HTTP, plus a batch where one request captures and the others do not.

Library (`LLMEngine`, this process): decode-only tokens/s ((tokens - 1) / (last - first token time)) of
one greedy fixed-length request, for each capture variant, the variants alternated round by round so
that drift hits all alike; the median of the rounds and its ratio to no capture are reported.
HTTP: `kvmini serve` in a subprocess, `POST /generate` streamed, the same figure from the arrival of
the token events, with and without attention. Batch: 8 requests decoding together, aggregate tokens/s,
with none or one of them capturing every layer and head. Writes bench/results/attention.json.
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
    DEFAULT_MODEL, english_text, load_average, machine, print_table, token_times, write_json,
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


def decode_rate_library(llm: LLM, prompt: list[int], n: int, capture) -> float:
    times = token_times(llm, prompt, n, capture)
    return (len(times) - 1) / (times[-1] - times[0])


def batch_rate(llm: LLM, prompts: list[list[int]], n: int, capture) -> float:
    """Aggregate decode tokens/s of the prompts run together; the first one captures (if `capture`)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, capture=capture if i == 0 else None)
    while any(not r.seq.output_ids for r in engine.requests.values()):  # prefill every prompt first
        engine.step()
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


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
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--out", default="attention")
    args = ap.parse_args()

    load_before = load_average()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization)
    ids = llm.tokenizer.encode(english_text())
    prompt = ids[: args.prompt_tokens]
    caps = variants(llm.config.num_hidden_layers, len(prompt))
    n = args.new_tokens

    for cap in caps.values():  # warm up every path
        decode_rate_library(llm, prompt, 8, cap)
    rates: dict[str, list[float]] = {name: [] for name in caps}
    batch_prompts = [ids[i * 50 : i * 50 + args.prompt_tokens] for i in range(args.batch)]
    batch: dict[str, list[float]] = {"none": [], "one of them captures all": []}
    for _ in range(args.repeats):
        for name, cap in caps.items():
            rates[name].append(decode_rate_library(llm, prompt, n, cap))
        batch["none"].append(batch_rate(llm, batch_prompts, n // 2, None))
        batch["one of them captures all"].append(batch_rate(llm, batch_prompts, n // 2, AttentionCapture()))
    base = statistics.median(rates["none"])
    library = [{"capture": name, "tok_s": statistics.median(v), "ratio": statistics.median(v) / base,
                "runs": [round(x, 2) for x in v]} for name, v in rates.items()]
    batch_base = statistics.median(batch["none"])
    batched = [{"batch": args.batch, "capture": name, "tok_s": statistics.median(v),
                "ratio": statistics.median(v) / batch_base, "runs": [round(x, 2) for x in v]}
               for name, v in batch.items()]
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
            runs: dict[str, list[float]] = {name: [] for name in bodies}
            for _ in range(args.repeats):
                for name, body in bodies.items():
                    runs[name].append(decode_rate(generate_times(server.url, prompt, n, body)))
        hbase = statistics.median(runs["none"])
        http = [{"attention": name, "tok_s": statistics.median(v), "ratio": statistics.median(v) / hbase,
                 "runs": [round(x, 2) for x in v]} for name, v in runs.items()]

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
        "repeats": args.repeats, "library": library, "batch": batched, "http": http,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
