"""KV-cache memory of MHA / GQA / MQA variants of one real model: formula vs measured, and what it costs.

For every KV-head count that divides the query heads (SmolLM2-135M: 9 heads -> MHA-9, GQA-3 = the original,
MQA-1; the others are made with `engine.kv_memory.variants`):
- sizing, per dtype: formula bytes per token; pool bytes read from tensor storage; bytes one sequence holds
  at each context (blocks reserved through the BlockManager); VmRSS growth from allocating the pool (fresh
  process); sequences admitted by a weightless LLMEngine at a memory budget until the scheduler refuses one;
- for the real variants (float32): perplexity on a fixed English text, greedy agreement with the original
  over 128 tokens on a few chat prompts, and batch-1 greedy decode tokens/s at a short and a long context;
- the cache table: every variant x KV-cache dtype (bfloat16, int8, fp8_e4m3; engine/cache/kv_quant.py) with a
  bfloat16 model: bytes per token, sequences admitted in the budget, and perplexity and greedy agreement
  read back through the cache (the text fed 64 tokens at a time, so attention reads the stored K/V).

`--sections` picks what runs; a section not run keeps its results from the last bench/results/kv_memory.json
(so the cache table can be redone without re-timing decode speed on a busy machine).

Writes bench/results/kv_memory.json, kv_memory.md and kv_memory.png (the plot needs matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, RESULTS, english_text, machine, print_table, write_json  # noqa: E402
from engine import LLM, Session  # noqa: E402
from engine.api.llm import parse_dtype  # noqa: E402
from engine.cache.blocks import BlockManager
from engine.cache.head_plan import HeadPlan
from engine.cache.head_pools import head_aware_blocks, head_aware_pools  # noqa: E402
from engine.cache.kv_policy import KVPolicy  # noqa: E402
from engine.cache.pools import CacheConfig, KVCache  # noqa: E402
from engine.core.config import ModelConfig  # noqa: E402
from engine.kv_memory.calibrate import calibrate
from engine.kv_memory.quality import Agreement, agreement, cached_compare, cached_perplexity, compare, greedy  # noqa: E402
from engine.kv_memory.sizing import SizingRow, blocks_for, formula_max_seqs, generated_seqs, size, token_bytes  # noqa: E402
from engine.kv_memory.variants import convert_kv_heads, divisors, variant_config, variant_name  # noqa: E402
from engine.kv_memory.window_quality import fed, forced_agreement, greedy_tokens  # noqa: E402

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Explain how a hash table works in a few sentences.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
]
MIB = 2**20


@dataclasses.dataclass
class VariantResult:
    """Quality and speed of one real variant, float32."""

    name: str
    kv_heads: int
    model_dir: str
    perplexity: float
    perplexity_tokens: int
    agreement: Agreement
    decode_tokens_per_s: dict[int, float]


@dataclasses.dataclass
class EvictionResult:
    """One variant x cache dtype x eviction (bfloat16 model): memory at long contexts, quality under eviction."""

    name: str
    kv_heads: int
    kv_cache_dtype: str  # "auto" = bfloat16
    eviction: str  # "full", "sink-window" or "head-aware"
    policy: str | None  # the sink + window kept (by every head, or by the head plan's window heads)
    full_fraction: float  # of the KV heads, those with a full cache
    bytes_per_token: int  # formula, full cache
    seqs: dict[int, int]  # context -> sequences generated to it at once in the budget (measured, see docstring)
    held_bytes: dict[int, int]  # context -> bytes one such sequence holds at its peak
    seqs_formula: dict[int, int]  # context -> budget // (bytes per token x blocks of context), full cache
    perplexity: float
    perplexity_tokens: int
    agreement: Agreement  # greedy (prefix, overall) and teacher-forced top-1, fed one token at a time


@dataclasses.dataclass
class CacheResult:
    """One variant with one KV-cache dtype (bfloat16 model): quality read back through the cache."""

    name: str
    kv_heads: int
    kv_cache_dtype: str  # "auto" = bfloat16
    bytes_per_token: int
    perplexity: float
    perplexity_tokens: int
    agreement: Agreement  # against the original model with a bfloat16 cache


# ---- quality and speed of loaded variants -------------------------------------------------------------------


def scored_window(session: Session, window: list[int]) -> tuple[float, int]:
    """Feed a text window into a session started on its first token: (sum of next-token NLL, tokens scored)."""
    return -sum(step.logprobs.logprob for step in session.feed(window[1:])), len(window) - 1


def perplexity_windows(llm: LLM, windows: list[list[int]]) -> tuple[float, int]:
    nll = scored = 0
    for window in windows:
        with llm.session(window[:1]) as s:
            n, k = scored_window(s, window)
        nll, scored = nll + n, scored + k
    return nll, scored


def interleaved_speeds(sessions: dict[tuple[str, int], Session], new_tokens: int) -> dict[tuple[str, int], float]:
    """Greedy batch-1 decode tokens/s of every (variant, context) session, one step of each in turn.

    Round-robin so every variant sees the same background load (the machine is shared), and 1 / median
    step time so a burst from another process does not decide the result.
    """
    for s in sessions.values():
        s.step()  # runs whatever is still uncomputed, so the timed steps are pure decode
    times: dict[tuple[str, int], list[float]] = {key: [] for key in sessions}
    for _ in range(new_tokens):
        for key, s in sessions.items():
            start = time.perf_counter()
            s.step()
            times[key].append(time.perf_counter() - start)
    return {key: 1.0 / statistics.median(t) for key, t in times.items()}


def load(model_dir: Path, args, prompts: list[list[int]]) -> LLM:
    """A float32 LLM whose pool holds both speed sessions, one more perplexity window and the agreement batch."""
    tokens = [c + args.speed_tokens + 2 for c in args.speed_contexts] + [max(args.speed_contexts)]
    tokens += [len(p) + args.agree_tokens for p in prompts]
    return LLM(model_dir, dtype="float32", num_blocks=sum(blocks_for(t, 16) for t in tokens))


def prepare(args, config: ModelConfig, kv_counts: list[int], workdir: Path) -> dict[str, Path]:
    """Checkpoint directory of every variant, the original first (converted ones written to `workdir`)."""
    dirs = {variant_name(config): args.model}
    for kv in kv_counts:
        if kv != config.num_key_value_heads:
            t = time.perf_counter()
            name = variant_name(variant_config(config, kv))
            dirs[name] = convert_kv_heads(args.model, kv, workdir / f"kv{kv}")
            print(f"converted {name} in {time.perf_counter() - t:.1f}s")
    return dirs


def run_quality(args, config: ModelConfig, kv_counts: list[int], workdir: Path) -> list[VariantResult]:
    """All variants loaded at once: the original's greedy outputs are the reference; the first perplexity
    window's prefill also fills the long-context speed session, so each long prefill runs once."""
    from engine.text.tokenizer import Tokenizer

    dirs = prepare(args, config, kv_counts, workdir)
    tok = Tokenizer.from_dir(args.model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
               for p in PROMPTS[: args.prompts]]
    short_ctx, long_ctx = sorted(args.speed_contexts)
    text = tok.encode(english_text())
    windows = [text[w * long_ctx : (w + 1) * long_ctx] for w in range(args.ppl_windows)]
    llms = {name: load(d, args, prompts) for name, d in dirs.items()}
    reference = greedy(llms[variant_name(config)], prompts, args.agree_tokens)

    sessions, ppl = {}, {}
    for name, llm in llms.items():
        t = time.perf_counter()
        sessions[(name, long_ctx)] = llm.session(windows[0][:1])
        nll, scored = scored_window(sessions[(name, long_ctx)], windows[0])
        more_nll, more_scored = perplexity_windows(llm, windows[1:])
        ppl[name] = (math.exp((nll + more_nll) / (scored + more_scored)), scored + more_scored)
        sessions[(name, short_ctx)] = llm.session(text[:short_ctx])
        print(f"{name}: perplexity {ppl[name][0]:.3f} ({time.perf_counter() - t:.0f}s)")
    speeds = interleaved_speeds(sessions, args.speed_tokens)
    for s in sessions.values():
        s.close()

    results = []
    for name, llm in llms.items():
        agree = compare(llm, prompts, reference)
        tps = {c: speeds[(name, c)] for c in (short_ctx, long_ctx)}
        print(f"{name}: {agree}, tok/s {tps}")
        results.append(VariantResult(name, llm.config.num_key_value_heads, str(dirs[name]), ppl[name][0],
                                     ppl[name][1], agree, tps))
    return sorted(results, key=lambda r: -r.kv_heads)


def run_cache_quality(args, config: ModelConfig, kv_counts: list[int], workdir: Path) -> list[CacheResult]:
    """Every variant with every KV-cache dtype, one loaded at a time; the reference is the original model's
    greedy output with a bfloat16 cache."""
    from engine.text.tokenizer import Tokenizer

    dirs = prepare(args, config, kv_counts, workdir)
    tok = Tokenizer.from_dir(args.model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
               for p in PROMPTS[: args.prompts]]
    window = max(args.speed_contexts)
    text = tok.encode(english_text())[: window * args.ppl_windows]
    pool = args.prompts * (max(len(p) for p in prompts) + args.agree_tokens) + window + 64
    reference = None
    results = []
    for name, d in dirs.items():
        for kind in ["auto", *args.kv_cache_dtypes]:
            t = time.perf_counter()
            llm = LLM(d, dtype="bfloat16", kv_cache_dtype=kind, num_blocks=blocks_for(pool, 16))
            if reference is None:  # the original (first), bfloat16 cache
                reference = greedy(llm, prompts, args.agree_tokens)
            ppl = cached_perplexity(llm, text, window=window)
            result = CacheResult(name, llm.config.num_key_value_heads, kind, llm.kv_cache.bytes_per_token,
                                 ppl.value, ppl.tokens_scored, cached_compare(llm, prompts, reference))
            print(f"{name} {kind}: perplexity {ppl.value:.3f}, {result.agreement} "
                  f"({time.perf_counter() - t:.0f}s)")
            results.append(result)
            del llm
    return sorted(results, key=lambda r: (-r.kv_heads, ["auto", *args.kv_cache_dtypes].index(r.kv_cache_dtype)))


def eviction_sizing(config: ModelConfig, kind: str, eviction: str, policy: KVPolicy, plan: HeadPlan | None,
                    budget: int, context: int) -> tuple[int, int]:
    """(sequences, bytes each) for sequences generated to `context` tokens together in `budget` bytes, through
    pools sized by the engine's own code on the meta device. Head-aware pools are sized for the number of
    sequences that fits best (the window pool keeps a window per sequence: `max_num_seqs` decides its size)."""
    cache = CacheConfig(kv_cache_memory=budget, kv_cache_dtype=kind)
    if eviction != "head-aware":
        blocks = BlockManager(KVCache(config, cache, torch.bfloat16, "meta"), enable_prefix_caching=False)
        return generated_seqs(blocks, context, policy if eviction == "sink-window" else None)
    full_blocks = blocks_for(context, cache.block_size)

    def fits(n: int) -> int:  # sequences that both pools hold when sized for n
        num_full, _ = head_aware_pools(config, cache, torch.bfloat16, plan, policy, n, context)
        return min(num_full // full_blocks, n)

    best = max(range(1, budget // (full_blocks * cache.block_size) + 2), key=fits)
    return generated_seqs(head_aware_blocks(config, cache, torch.bfloat16, "meta", plan, policy, best, context),
                          context)


def run_eviction(args, config: ModelConfig, kv_counts: list[int], workdir: Path) -> list[EvictionResult]:
    """Every variant x cache dtype x {full, sink + window, head-aware}, a bfloat16 model, one loaded at a time.

    Quality is measured where eviction acts: `--eviction-tokens` of text after a prefill of sink + window
    tokens, each fed alone (a decode step), and 128 greedy tokens after text prompts of 512 tokens (longer
    than the window, so the first step already evicts), against the original model with a full bfloat16 cache.
    Each variant's head plan is calibrated on the text's last 1024 tokens, which nothing here scores."""
    from engine.text.tokenizer import Tokenizer

    dirs = prepare(args, config, kv_counts, workdir)
    text = Tokenizer.from_dir(args.model).encode(english_text())
    policy, prefill = KVPolicy(args.sink, args.window), args.sink + args.window
    token_ids = text[: prefill + args.eviction_tokens]
    prompts = [text[len(token_ids) + i * 512 : len(token_ids) + (i + 1) * 512] for i in range(args.prompts)]
    pool = blocks_for(prefill + args.eviction_tokens, 16) + args.prompts * blocks_for(512 + args.agree_tokens, 16)
    reference, results = None, []
    for name, d in dirs.items():
        plan = calibrate(LLM(d, dtype="bfloat16", num_blocks=max(pool, blocks_for(1024, 16))), text[-1024:])
        vcfg = ModelConfig.from_dir(d)
        for kind in ["auto", *args.kv_cache_dtypes[:1]]:
            for eviction in ("full", "sink-window", "head-aware"):
                t = time.perf_counter()
                aware = {"kv_policy": policy, "head_plan": plan} if eviction == "head-aware" else {}
                llm = LLM(d, dtype="bfloat16", kv_cache_dtype=kind, num_blocks=pool, **aware)
                own = policy if eviction == "sink-window" else None  # head-aware: the engine's, not a request's
                if reference is None:  # the original (first), full bfloat16 cache
                    reference = greedy_tokens(llm, prompts, args.agree_tokens, None)
                nll, _ = fed(llm, token_ids, prefill, own)
                prefix, overall = agreement(reference, greedy_tokens(llm, prompts, args.agree_tokens, own))
                agree = Agreement(prefix, overall, forced_agreement(llm, prompts, reference, own))
                sized = {c: eviction_sizing(vcfg, kind, eviction, policy, plan, args.budget, c)
                         for c in args.eviction_contexts}
                fraction = plan.full_fraction if eviction == "head-aware" else float(eviction == "full")
                result = EvictionResult(
                    name, vcfg.num_key_value_heads, kind, eviction, None if eviction == "full" else str(policy),
                    fraction, token_bytes(vcfg, torch.bfloat16, kind), {c: v[0] for c, v in sized.items()},
                    {c: v[1] for c, v in sized.items()},
                    {c: formula_max_seqs(vcfg, torch.bfloat16, 16, args.budget, c, kind) for c in sized},
                    math.exp(sum(nll) / len(nll)), len(nll), agree)
                print(f"{name} {kind} {eviction}: perplexity {result.perplexity:.3f}, {agree}, seqs {result.seqs} "
                      f"({time.perf_counter() - t:.0f}s)", flush=True)
                results.append(result)
                del llm
    return results


def run_sizing(args, config: ModelConfig, kv_counts: list[int]) -> list[SizingRow]:
    """Each dtype with its own cache, then the 8-bit caches (with the last dtype as the model's)."""
    kinds = [(dtype, "auto") for dtype in args.dtypes] + [(args.dtypes[-1], k) for k in args.kv_cache_dtypes]
    rows = []
    for dtype, kind in kinds:
        for kv in sorted(kv_counts, reverse=True):
            rows.append(size(variant_config(config, kv), parse_dtype(dtype), args.contexts, args.budget,
                             args.budget_contexts, kv_cache_dtype=kind))
    return rows


def cache_label(row: dict) -> str:
    """What the cache stores: the dtype, or the 8-bit kind."""
    return row["dtype"] if row.get("kv_cache_dtype", "auto") == "auto" else row["kv_cache_dtype"]


# ---- output -----------------------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    s, q, a = payload["settings"], payload["quality"], payload["sizing"]
    ctx, bctx = s["contexts"], s["budget_contexts"]
    lines = [
        f"# KV-cache memory: {payload['model']}",
        "",
        f"Machine: {payload['machine']['cpu']} ({payload['machine']['cores']} cores, shared), "
        f"torch {payload['machine']['torch']}; block size 16; run took {payload['runtime_s']:.0f} s.",
        "",
        "## Bytes per token and pool (formula vs tensor storage, RSS growth in a fresh process)",
        "",
        "| variant | dtype | KV bytes/token | pool blocks | pool MiB (formula) | pool MiB (storage) | RSS growth MiB "
        "| all exact |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in a:
        rss = f"{r['rss_growth'] / MIB:.1f}" if r["rss_growth"] is not None else "n/a"
        lines.append(f"| {r['name']} | {cache_label(r)} | {r['bytes_per_token']:,} | {r['pool_blocks']} | "
                     f"{r['pool_bytes_formula'] / MIB:.2f} | {r['pool_bytes_measured'] / MIB:.2f} | {rss} | "
                     f"{'yes' if r['exact'] else 'NO'} |")
    lines += ["", "## Bytes one sequence holds (measured via BlockManager.held_bytes, MiB; equal to the formula "
              "where 'all exact' says yes)", "",
              "| variant | dtype | " + " | ".join(str(c) for c in ctx) + " |",
              "|---|---|" + "---:|" * len(ctx)]
    for r in a:
        lines.append(f"| {r['name']} | {cache_label(r)} | " + " | ".join(
            f"{r['held_measured'][str(c)] / MIB:.2f}" for c in ctx) + " |")
    lines += ["", f"## Concurrent sequences in a {s['budget'] / 2**30:g} GiB budget (admitted by the scheduler; "
              "formula in brackets where it differs)", "",
              "| variant | dtype | " + " | ".join(f"ctx {c}" for c in bctx) + " |",
              "|---|---|" + "---:|" * len(bctx)]
    for r in a:
        cells = []
        for c in bctx:
            got, want = r["max_seqs_admitted"][str(c)], r["max_seqs_formula"][str(c)]
            cells.append(f"{got}" if got == want else f"{got} ({want})")
        lines.append(f"| {r['name']} | {cache_label(r)} | " + " | ".join(cells) + " |")
    if q:
        sc = sorted(int(c) for c in q[0]["decode_tokens_per_s"])
        lines += ["", "## Quality and speed of the real variants (float32)", "",
                  f"Perplexity over {q[0]['perplexity_tokens']} tokens of `english_text()`; agreement over "
                  f"{s['agree_tokens']} greedy tokens on {s['prompts']} chat prompts.", "",
                  "| variant | perplexity | agree until 1st diff | agree overall | forced top-1 | "
                  + " | ".join(f"tok/s @ {c}" for c in sc) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(sc)]
        for v in q:
            g = v["agreement"]
            lines.append(f"| {v['name']} | {v['perplexity']:.3f} | {g['prefix']:.3f} | {g['overall']:.3f} | "
                         f"{g['forced_top1']:.3f} | " + " | ".join(
                             f"{v['decode_tokens_per_s'][str(c)]:.2f}" for c in sc) + " |")
    lines += cache_table(payload)
    lines += eviction_table(payload)
    return "\n".join(lines) + "\n"


def eviction_table(payload: dict) -> list[str]:
    """Variant x cache dtype x eviction: bytes and sequences at long contexts, quality where eviction acts."""
    rows, s = payload.get("eviction") or [], payload["settings"]
    if not rows:
        return []
    ctx = sorted(int(c) for c in rows[0]["seqs"])
    lines = ["", "## Eviction: full cache, sink + window, head-aware (a bfloat16 model)", "",
             f"Sink + window keeps {rows[1]['policy'] or ''} for every head; head-aware keeps it for the KV heads "
             "the head plan leaves to the window and a full cache for the rest (`full heads`). Sequences: "
             f"generated to the context together in {s['budget'] / 2**30:g} GiB, each pool's blocks over the "
             "blocks one sequence held at its peak (grown token by token through the BlockManager, pools sized by "
             "the engine's code; formula: the full cache). Perplexity over "
             f"{rows[0]['perplexity_tokens']} tokens of `english_text()` after a {s['sink'] + s['window']}-token "
             f"prefill, each fed alone; agreement over {s['agree_tokens']} greedy tokens after {s['prompts']} text "
             "prompts of 512 tokens, against the original model with a full bfloat16 cache, and teacher-forced "
             "(its tokens fed one at a time).", "",
             "| variant | cache | eviction | full heads | "
             + " | ".join(f"MiB/seq @ {c} | seqs @ {c} (formula)" for c in ctx)
             + " | perplexity | agree until 1st diff | agree overall | forced top-1 |",
             "|---|---|---|---:|" + "---:|---:|" * len(ctx) + "---:|---:|---:|---:|"]
    for r in rows:
        g = r["agreement"]
        cells = []
        for c in ctx:
            cells += [f"{r['held_bytes'][str(c)] / MIB:.1f}", f"{r['seqs'][str(c)]} ({r['seqs_formula'][str(c)]})"]
        label = "bfloat16" if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"]
        lines.append(f"| {r['name']} | {label} | {r['eviction']} | {r['full_fraction']:.0%} | "
                     + " | ".join(cells)
                     + f" | {r['perplexity']:.3f} | {g['prefix']:.3f} | {g['overall']:.3f} | {g['forced_top1']:.3f} |")
    return lines


def cache_table(payload: dict) -> list[str]:
    """Variant x KV-cache dtype: bytes, sequences in the budget, quality read through the cache."""
    rows, s = payload.get("cache_quality") or [], payload["settings"]
    if not rows:
        return []
    admitted = {(r["name"], cache_label(r)): r["max_seqs_admitted"] for r in payload["sizing"]
                if r["dtype"] == "bfloat16"}
    bctx = [c for c in (2048, 8192) if str(c) in next(iter(admitted.values()), {})]
    lines = ["", "## Cache dtypes: a bfloat16 model with a bfloat16, int8 or fp8 cache", "",
             f"Perplexity over {rows[0]['perplexity_tokens']} tokens of `english_text()` and agreement over "
             f"{s['agree_tokens']} greedy tokens on {s['prompts']} chat prompts against the original model with a "
             "bfloat16 cache, both read back through the cache (the text fed 64 tokens at a time). Sequences: "
             f"admitted by the scheduler in {s['budget'] / 2**30:g} GiB.", "",
             "| variant | cache | KV bytes/token | " + " | ".join(f"seqs @ {c}" for c in bctx)
             + " | perplexity | agree until 1st diff | agree overall | forced top-1 |",
             "|---|---|---:|" + "---:|" * len(bctx) + "---:|---:|---:|---:|"]
    for r in rows:
        label = "bfloat16" if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"]
        seqs = admitted.get((r["name"], label), {})
        g = r["agreement"]
        lines.append(f"| {r['name']} | {label} | {r['bytes_per_token']:,} | "
                     + " | ".join(str(seqs.get(str(c), "n/a")) for c in bctx)
                     + f" | {r['perplexity']:.3f} | {g['prefix']:.3f} | {g['overall']:.3f} | {g['forced_top1']:.3f} |")
    return lines


def plot(payload: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (`make setup` installs it in a checkout; "
              "elsewhere pip install 'kvmini[plot]' or matplotlib)")
        return None
    s, rows, eviction = payload["settings"], payload["sizing"], payload.get("eviction") or []
    fig, axes = plt.subplots(1, 3 if eviction else 2, figsize=(15 if eviction else 10, 3.8))
    left, right = axes[0], axes[1]
    names = list(dict.fromkeys(r["name"] for r in rows))
    color = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per variant, one line style per dtype
    styles = dict(zip(dict.fromkeys(cache_label(r) for r in rows), ["-", "--", ":", "-."]))  # one per cache kind
    for r in rows:
        ctx = sorted(int(c) for c in r["held_measured"])
        left.plot(ctx, [r["held_measured"][str(c)] / MIB for c in ctx], styles.get(cache_label(r), "-"),
                  color=color[r["name"]], marker="o", ms=3, label=f"{r['name']} {cache_label(r)}")
    left.set(yscale="log", xlabel="context length (tokens)", ylabel="KV MiB held by one sequence",
             title="Per-sequence KV memory (measured)")
    left.set_xscale("log", base=2)
    left.legend(fontsize=7)
    left.grid(alpha=0.3, which="both")
    first = [r for r in rows if cache_label(r) == s["dtypes"][0]]
    bctx = s["budget_contexts"]
    width = 0.8 / len(first)
    for i, r in enumerate(first):
        xs = [j + i * width for j in range(len(bctx))]
        bars = right.bar(xs, [r["max_seqs_admitted"][str(c)] for c in bctx], width, color=color[r["name"]],
                         label=r["name"])
        right.bar_label(bars, fontsize=7)
    right.set_xticks([j + width * (len(first) - 1) / 2 for j in range(len(bctx))], [str(c) for c in bctx])
    right.set(yscale="log", xlabel="context length (tokens)", ylabel="sequences admitted",
              title=f"Max concurrent sequences, {s['budget'] / 2**30:g} GiB {s['dtypes'][0]}")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    if eviction:
        plot_eviction(axes[2], eviction, color, s)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


OFF_SCALE_PERPLEXITY = 100  # variants this broken (mean-pooled MQA: ~15,000) would flatten the others' points


def plot_eviction(ax, rows: list[dict], color: dict, s: dict) -> None:
    """Memory against quality: sequences in the budget at the longest context, perplexity under eviction."""
    ctx = str(max(int(c) for c in rows[0]["seqs"]))
    markers = {"full": "o", "sink-window": "s", "head-aware": "^"}
    off_scale = sorted({r["name"] for r in rows if r["perplexity"] > OFF_SCALE_PERPLEXITY})
    for r in (r for r in rows if r["name"] not in off_scale):
        filled = r["kv_cache_dtype"] == "auto"
        ax.scatter(r["seqs"][ctx], r["perplexity"], marker=markers[r["eviction"]], s=40,
                   facecolors=color.get(r["name"], "k") if filled else "none", edgecolors=color.get(r["name"], "k"))
    for name, marker in markers.items():
        ax.scatter([], [], marker=marker, color="grey", label=name)
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="grey", label="int8 cache (hollow)")
    ax.set(xscale="log", xlabel=f"sequences of {ctx} tokens in {s['budget'] / 2**30:g} GiB",
           ylabel="perplexity (lower is better)", title="Eviction: memory vs quality (bfloat16 model)"
           + (f"\n{', '.join(off_scale)}: perplexity > {OFF_SCALE_PERPLEXITY}, not shown" if off_scale else ""))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--kv-heads", type=int, nargs="+", help="KV-head counts (default: every divisor of the heads)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--kv-cache-dtypes", nargs="*", default=["int8", "fp8_e4m3"],
                    help="8-bit caches sized (with the last --dtypes as the model's) and measured (bfloat16 model)")
    ap.add_argument("--sections", nargs="+", default=["sizing", "quality", "cache", "eviction"],
                    choices=["sizing", "quality", "cache", "eviction"],
                    help="what to run; the others keep their results from the last kv_memory.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1000, 1024, 2048, 4096, 8192])
    ap.add_argument("--budget", type=int, default=2**30, help="bytes (default 1 GiB)")
    ap.add_argument("--budget-contexts", type=int, nargs="+", default=[256, 1000, 2048, 8192])
    ap.add_argument("--speed-contexts", type=int, nargs=2, default=[128, 2048])
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--ppl-windows", type=int, default=2,
                    help="text windows scored for perplexity, each as long as the long speed context")
    ap.add_argument("--agree-tokens", type=int, default=128)
    ap.add_argument("--sink", type=int, default=4, help="eviction table: sink tokens kept")
    ap.add_argument("--window", type=int, default=252, help="eviction table: window tokens kept")
    ap.add_argument("--eviction-tokens", type=int, default=1024, help="eviction table: tokens scored for perplexity")
    ap.add_argument("--eviction-contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--skip-quality", action="store_true", help="sizing only (no weights are run)")
    ap.add_argument("--variants-dir", type=Path, help="keep the converted checkpoints here (default: a temp dir)")
    # One thread by default: on a small shared machine two OpenMP threads spin against other processes and
    # decode several times slower and far noisier (measured 1.6 vs 9.7 tok/s here); 0 = torch's default.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    ap.add_argument("--replot", action="store_true", help="only rewrite the markdown and plot from the JSON")
    args = ap.parse_args()
    if args.replot:
        payload = json.loads((RESULTS / "kv_memory.json").read_text())
        (RESULTS / "kv_memory.md").write_text(markdown(payload))
        print(plot(payload, RESULTS / "kv_memory.png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    config = ModelConfig.from_dir(args.model)
    kv_counts = args.kv_heads or divisors(config.num_attention_heads)
    for kv in kv_counts:
        variant_config(config, kv)  # fail fast on a bad count
    previous = json.loads((RESULTS / "kv_memory.json").read_text()) if (RESULTS / "kv_memory.json").is_file() else {}
    sections = set(args.sections) - ({"quality", "cache", "eviction"} if args.skip_quality else set())
    sizing = run_sizing(args, config, kv_counts) if "sizing" in sections else previous.get("sizing", [])
    print(f"sizing done in {time.perf_counter() - start:.0f}s")
    quality, cache = previous.get("quality", []), previous.get("cache_quality", [])
    eviction = previous.get("eviction", [])
    with tempfile.TemporaryDirectory(prefix="kv_variants_") as tmp:
        if "quality" in sections:
            quality = run_quality(args, config, kv_counts, args.variants_dir or Path(tmp))
        if "cache" in sections:
            cache = run_cache_quality(args, config, kv_counts, args.variants_dir or Path(tmp))
        if "eviction" in sections:
            eviction = run_eviction(args, config, kv_counts, args.variants_dir or Path(tmp))

    payload = {
        "benchmark": "kv_memory",
        "machine": machine(),
        "model": str(args.model.name),
        "config": config.to_dict(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizing": [dataclasses.asdict(r) | {"exact": r.exact} if isinstance(r, SizingRow) else r for r in sizing],
        "quality": [dataclasses.asdict(v) if isinstance(v, VariantResult) else v for v in quality],
        "cache_quality": [dataclasses.asdict(v) if isinstance(v, CacheResult) else v for v in cache],
        "eviction": [dataclasses.asdict(v) if isinstance(v, EvictionResult) else v for v in eviction],
        "runtime_s": time.perf_counter() - start,
    }
    payload = _json_keys(payload)
    json_path = write_json("kv_memory", payload)
    (RESULTS / "kv_memory.md").write_text(markdown(payload))
    png = plot(payload, RESULTS / "kv_memory.png")
    print_table(["variant", "cache", "B/token", f"held @{max(args.contexts)} MiB", "exact"],
                [[r["name"], cache_label(r), r["bytes_per_token"], r["held_measured"][str(max(args.contexts))] / MIB,
                  r["exact"]] for r in payload["sizing"]])
    print(f"wrote {json_path}, {RESULTS / 'kv_memory.md'}" + (f", {png}" if png else "")
          + f" in {payload['runtime_s']:.0f}s")


def _json_keys(obj):
    """JSON turns int dict keys into strings; do it up front so markdown() reads the same as a loaded file."""
    return json.loads(json.dumps(obj))


if __name__ == "__main__":
    main()
