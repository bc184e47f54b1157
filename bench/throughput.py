"""Mixed-workload throughput: N requests submitted at once, continuous batching vs static batches.

Seeded random prompt lengths (16-512) cut from a fixed English text and output lengths (16-256); a second
variant gives every prompt the same 256-token prefix. kvmini runs all requests through one LLMEngine;
transformers runs the same requests in static, left-padded batches of 32 (each batch decodes until its
longest request is done; only each request's own tokens count). kvmini is batch-invariant, as by default;
--without-invariance runs the same requests again with `batch_invariant=False`. Writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, english_text, load_average, machine, print_table, write_json  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402


def make_requests(corpus: list[int], n: int, seed: int, shared_prefix: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    prefix = corpus[:shared_prefix]
    reqs = []
    for _ in range(n):
        length = rng.randint(16, 512)
        start = rng.randrange(shared_prefix, len(corpus) - length)
        body = corpus[start : start + max(length - shared_prefix, 1)]
        reqs.append((prefix + body, rng.randint(16, 256)))
    return reqs


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_kvmini(llm: LLM, reqs: list[tuple[list[int], int]]) -> dict:
    engine = llm.engine
    start = time.perf_counter()
    ids = {
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)): i
        for i, (p, n) in enumerate(reqs)
    }
    first, last, itl, peak, produced = {}, {}, [], 0, 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        peak = max(peak, llm.blocks.allocator.num_used)
        for out in outs:
            produced += len(out.new_token_ids)
            rid = out.request_id
            if rid not in first:
                first[rid] = now - start
            else:
                itl.append(now - last[rid])
            last[rid] = now
    elapsed = time.perf_counter() - start
    ttft = list(first.values())
    stats = engine.stats()
    return {
        "output_tokens": produced,
        "seconds": elapsed,
        "output_tokens_per_s": produced / elapsed,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "peak_kv_blocks_used": peak,
        "kv_blocks_total": stats["kv_blocks_total"],
        "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
        "preemptions": stats["preemptions"],
        "requests": len(ids),
    }


def run_transformers(model, reqs: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> dict:
    start = time.perf_counter()
    ttft, produced = [], 0
    for b in range(0, len(reqs), batch_size):
        batch = reqs[b : b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(n for _, n in batch), do_sample=False,
                pad_token_id=pad_id,
            )
        # Static batching: every request of the batch gets its first token after the batch's prefill,
        # which starts when the previous batch is completely done.
        ttft += [t0 - start] * len(batch)
        produced += sum(n for _, n in batch)
    elapsed = time.perf_counter() - start
    return {
        "output_tokens": produced,
        "seconds": elapsed,
        "output_tokens_per_s": produced / elapsed,
        "ttft_p50_s_lower_bound": percentile(ttft, 50),
        "ttft_p99_s_lower_bound": percentile(ttft, 99),
        "batch_size": batch_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None, help="kvmini's weight quantization (default: dense)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--without-invariance", action="store_true",
                    help="also run kvmini with batch_invariant=False (what batch invariance costs), same requests")
    args = ap.parse_args()

    load = load_average()

    def engine(batch_invariant: bool) -> LLM:
        return LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_memory=args.kv_cache_memory,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   batch_invariant=batch_invariant)

    llm = engine(True)
    fast = engine(False) if args.without_invariance else None
    corpus = llm.tokenizer.encode(english_text())
    hf = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
        hf.generation_config.eos_token_id = None  # fixed lengths, like ignore_eos
    for e in (llm, fast):
        if e is not None:
            e.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4))  # warm up
    variants = {}
    for name, prefix in (("random", 0), ("shared_prefix_256", 256)):
        reqs = make_requests(corpus, args.num_requests, args.seed, prefix)
        llm.blocks.reset_prefix_cache()  # each variant starts cold
        ours = run_kvmini(llm, reqs)
        ref = run_transformers(hf, reqs, args.hf_batch_size, 0) if hf is not None else None
        variants[name] = {"kvmini": ours, "transformers": ref}
        if ref:
            variants[name]["ratio"] = ours["output_tokens_per_s"] / ref["output_tokens_per_s"]
        if fast is not None:
            fast.blocks.reset_prefix_cache()
            other = run_kvmini(fast, reqs)
            variants[name]["kvmini_without_invariance"] = other
            variants[name]["invariant_over_fast"] = ours["output_tokens_per_s"] / other["output_tokens_per_s"]
    rows = []
    for name, v in variants.items():
        o, r = v["kvmini"], v["transformers"]
        rows.append([
            name, o["output_tokens_per_s"], r["output_tokens_per_s"] if r else "-", v.get("ratio", "-"),
            o["ttft_p50_s"], o["ttft_p99_s"], o["itl_p50_s"] * 1e3, o["itl_p99_s"] * 1e3,
            o["peak_kv_blocks_used"], o["prefix_cache_hit_rate"],
        ])
    print(f"load average {load:.2f}; {args.num_requests} requests, {args.dtype}, "
          f"quantization {args.quantization or 'none'}, seed {args.seed}")
    print_table(
        ["workload", "kvmini tok/s", "HF static tok/s", "ratio", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms",
         "ITL p99 ms", "peak blocks", "prefix hit"],
        rows,
    )
    if fast is not None:
        print_table(["workload", "batch-invariant tok/s", "not invariant tok/s", "ratio", "TTFT p50 s (not inv.)"],
                    [[name, v["kvmini"]["output_tokens_per_s"], v["kvmini_without_invariance"]["output_tokens_per_s"],
                      v["invariant_over_fast"], v["kvmini_without_invariance"]["ttft_p50_s"]]
                     for name, v in variants.items()])
    payload = {"benchmark": "throughput", "load_average_1m": load, "quantization": args.quantization,
               "dtype": args.dtype, "num_requests": args.num_requests,
               "seed": args.seed, "machine": machine(), "variants": variants}
    print(f"wrote {write_json('throughput', payload)}")


if __name__ == "__main__":
    main()
