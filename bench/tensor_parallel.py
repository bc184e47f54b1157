"""Tensor parallelism: decode speed and KV-cache bytes per rank with 1, 2 and 3 ranks (engine/exec).

Which sizes a model allows: N must divide its KV heads, its query heads and its MLP rows. SmolLM2-135M has
9 query heads over 3 KV heads, so only 1 and 3 ranks (9 too, but not on a small machine), whatever its KV
grouping: 9 has no even divisor. Three models therefore:

    smollm2      the real model, GQA-3                                    ranks 1, 3
    mha-9        its MHA variant (`kvmini kv-heads --kv-heads 9`)          ranks 1, 3
    shaped-6kv   SmolLM2's shape (30 layers, hidden 576, MLP 1536, vocab 49152) with 12 query heads of 48
                 over 6 KV heads, random weights: speed depends on shapes, not values   ranks 1, 2, 3

For each (model, ranks): a greedy batch-1 decode (a 32-token prompt, 128 new tokens; decode only, as
bench/decode.py) and a batch-8 decode (8 such prompts at once; tokens per second of the steps after the
prefill), with the KV pool's bytes per token and per rank (the pool is the whole `--kv-cache-memory`, split
over the ranks). Threads per rank: `--threads`, else the engine's default (torch's thread count / N).

Only one tensor-parallel group can live in a process, so each configuration is loaded, warmed up, timed and
closed in turn; configurations alternate repeat by repeat, and medians are reported. Writes
bench/results/tensor_parallel.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DEFAULT_MODEL,
    RESULTS,
    english_text,
    load_average,
    machine,
    print_table,
    token_times,
    write_json,
)
from engine import LLM, SamplingParams  # noqa: E402

RANKS = {"smollm2": [1, 3], "mha-9": [1, 3], "shaped-6kv": [1, 2, 3]}


def mha_variant(model_dir: Path, workdir: Path) -> Path:
    from engine.kv_memory.variants import convert_kv_heads

    return convert_kv_heads(model_dir, 9, workdir / "mha-9")


def shaped_variant(model_dir: Path, workdir: Path, heads: int = 12, kv_heads: int = 6) -> Path:
    """`model_dir`'s shape and tokenizer with `heads` query heads over `kv_heads` (same hidden size), random
    weights (std 0.02) in bfloat16."""
    from safetensors.torch import save_file

    from engine.core.config import ModelConfig
    from engine.model.checkpoint import expected_shapes

    out = workdir / "shaped-6kv"
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=raw["hidden_size"] // heads)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02)
               .to(torch.bfloat16) for name, shape in expected_shapes(ModelConfig.from_dir(out)).items()}
    save_file(tensors, str(out / "model.safetensors"))
    return out


def batch_tokens_per_s(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens per second of the steps after the one that prefilled every prompt (all prompts fit one step)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # the prefill (and each request's first token)
    start, count = time.perf_counter(), 0
    while engine.has_unfinished():
        count += sum(len(o.new_token_ids) for o in engine.step())
    return count / (time.perf_counter() - start)


def measure(model_dir: Path, ranks: int, args: argparse.Namespace, prompt: list[int], threads: int) -> dict:
    started = time.perf_counter()
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, quantization=args.quantization, threads=threads,
              kv_cache_memory=args.kv_cache_memory, tensor_parallel_size=ranks)
    try:
        startup = time.perf_counter() - started
        token_times(llm, prompt, 8)  # warm up
        times = token_times(llm, prompt, args.new_tokens)
        batch = batch_tokens_per_s(llm, [prompt[i:] + prompt[:i] for i in range(args.batch)], args.batch_new_tokens)
        return {
            "threads_per_rank": torch.get_num_threads(),
            "startup_s": startup,
            "batch1_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            f"batch{args.batch}_tokens_per_s": batch,
            "kv_blocks": llm.kv_cache.num_blocks,
            "kv_bytes_per_token_per_rank": llm.kv_cache.bytes_per_token,
            "kv_pool_bytes_per_rank": llm.kv_cache.pool_bytes(),
        }
    finally:
        llm.close()


def summarise(runs: dict[tuple[str, int], list[dict]], batch: int) -> list[dict]:
    rows = []
    for (model, ranks), results in runs.items():
        row = {"model": model, "ranks": ranks, **{k: v for k, v in results[0].items() if not k.endswith("_s")}}
        for key in ("batch1_tokens_per_s", f"batch{batch}_tokens_per_s", "startup_s"):
            row[key] = statistics.median(r[key] for r in results)
            row[f"runs_{key}"] = sorted(r[key] for r in results)
        one = runs.get((model, 1))
        if one:
            for key in ("batch1_tokens_per_s", f"batch{batch}_tokens_per_s"):
                row[f"{key}_vs_1_rank"] = row[key] / statistics.median(r[key] for r in one)
        rows.append(row)
    return rows


def markdown(payload: dict) -> str:
    b = payload["batch"]
    lines = [
        "# Tensor parallelism: decode speed and KV cache per rank",
        "",
        f"Machine: {payload['machine']['cpu']} ({payload['machine']['cores']} cores), torch "
        f"{payload['machine']['torch']}; load average {payload['load_average_1m']:.2f} at the start, "
        f"{payload['load_average_1m_end']:.2f} at the end; {payload['dtype']}, quantization "
        f"{payload['quantization'] or 'none'}; KV pool {payload['kv_cache_memory'] / 2**20:g} MiB in all; "
        f"{payload['repeats']} alternating repeats (median).",
        "",
        f"| model | ranks | threads/rank | KV B/token/rank | pool MiB/rank | batch-1 tok/s | vs 1 rank | "
        f"batch-{b} tok/s | vs 1 rank | start s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['model']} | {r['ranks']} | {r['threads_per_rank']} | {r['kv_bytes_per_token_per_rank']:,} | "
            f"{r['kv_pool_bytes_per_rank'] / 2**20:.1f} | {r['batch1_tokens_per_s']:.1f} | "
            f"{r.get('batch1_tokens_per_s_vs_1_rank', 1):.2f}x | {r[f'batch{b}_tokens_per_s']:.1f} | "
            f"{r.get(f'batch{b}_tokens_per_s_vs_1_rank', 1):.2f}x | {r['startup_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--models", nargs="+", default=list(RANKS), choices=list(RANKS))
    ap.add_argument("--ranks", type=int, nargs="+", help="only these rank counts (default: each model's own)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quantization", default=None, choices=["int8", "int4", "auto"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ranks r on cuda:r)")
    ap.add_argument("--threads", type=int, help="torch threads per rank (default: torch's count / ranks)")
    ap.add_argument("--kv-cache-memory", type=int, default=256 * 2**20, help="the whole pool, bytes")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants-dir", type=Path, help="keep the derived checkpoints here (default: a temp dir)")
    args = ap.parse_args()

    from engine.text.tokenizer import Tokenizer

    load, facts = load_average(), machine()  # before any LLM sets the thread count
    workdir = args.variants_dir or Path(tempfile.mkdtemp(prefix="kvmini-tp-"))
    dirs = {"smollm2": args.model}
    if "mha-9" in args.models:
        dirs["mha-9"] = mha_variant(args.model, workdir)
    if "shaped-6kv" in args.models:
        dirs["shaped-6kv"] = shaped_variant(args.model, workdir)
    prompt = Tokenizer.from_dir(args.model).encode(english_text())[: args.prompt_tokens]
    configs = [(m, n) for m in args.models for n in RANKS[m] if args.ranks is None or n in args.ranks]
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    began = time.perf_counter()
    for repeat in range(args.repeats):
        for model, ranks in configs:  # alternate: a slow phase of a shared machine hits every configuration
            # The cores shared out as the engine does by default, from the thread count this process began with
            # (a tensor-parallel LLM lowers the process's count, and the next LLM would start from that).
            threads = args.threads or max(1, facts["torch_threads"] // ranks)
            runs[(model, ranks)].append(measure(dirs[model], ranks, args, prompt, threads))
            print(f"repeat {repeat + 1}/{args.repeats}: {model} x{ranks} done", file=sys.stderr, flush=True)
    results = summarise(runs, args.batch)
    payload = {
        "benchmark": "tensor_parallel",
        "model": args.model.name,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "kv_cache_memory": args.kv_cache_memory,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "batch_new_tokens": args.batch_new_tokens,
        "repeats": args.repeats,
        "load_average_1m": load,
        "load_average_1m_end": load_average(),
        "seconds": time.perf_counter() - began,
        "machine": facts,
        "results": results,
    }
    b = args.batch
    print_table(["model", "ranks", "threads", "KV B/token/rank", "pool MiB/rank", "batch-1 tok/s", f"batch-{b} tok/s"],
                [[r["model"], r["ranks"], r["threads_per_rank"], r["kv_bytes_per_token_per_rank"],
                  r["kv_pool_bytes_per_rank"] / 2**20, r["batch1_tokens_per_s"], r[f"batch{b}_tokens_per_s"]]
                 for r in results])
    path = write_json("tensor_parallel", payload)
    (RESULTS / "tensor_parallel.md").write_text(markdown(payload))
    print(f"wrote {path}, {RESULTS / 'tensor_parallel.md'}")


if __name__ == "__main__":
    main()
