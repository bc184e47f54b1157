"""`kvmini kv-heads` (re-group a checkpoint's KV heads) and `kvmini kv-memory` (KV-cache sizing table)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from engine.cache.head_plan import DEFAULT_KEEP_LABELS
from engine.cache.kv_quant import KV_CACHE_DTYPES

DTYPE_CHOICES = ["float32", "bfloat16", "float16"]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def add_subcommands(subparsers) -> None:
    """Register `kv-heads` and `kv-memory` on the main CLI's subparsers."""
    k = subparsers.add_parser(
        "kv-heads",
        help="write a copy of a model with another KV-head count (MHA by repetition, GQA/MQA by mean-pooling)",
    )
    k.add_argument("model", type=Path, help="HF-format model directory")
    k.add_argument("--kv-heads", type=int, required=True, help="new KV-head count (a divisor of the query heads)")
    k.add_argument("--out", type=Path, required=True, help="output directory")
    k.set_defaults(func=run_kv_heads)

    m = subparsers.add_parser(
        "kv-memory",
        help="KV-cache sizing: bytes per token/sequence and sequences per budget, formula and measured",
        description="Sizes the KV cache of a model directory, or of a synthetic shape given by --layers, --heads "
        "and --head-dim, for every KV-head count the query heads allow (the model's own is marked *). "
        "'measured' columns come from allocating the pool, reserving a sequence's blocks and admitting "
        "requests into a weightless engine until the scheduler refuses one.",
    )
    m.add_argument("model", type=Path, nargs="?", help="HF-format model directory (default: the SmolLM2 weights)")
    m.add_argument("--layers", type=int, help="synthetic shape: decoder layers")
    m.add_argument("--heads", type=int, help="synthetic shape: query heads")
    m.add_argument("--kv-heads", type=int, help="synthetic shape: KV heads (default: --heads, i.e. MHA)")
    m.add_argument("--head-dim", type=int, help="synthetic shape: head dimension")
    m.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="cache dtype (default float32)")
    m.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto (--dtype), or int8 / fp8_e4m3: 8 bits and a float16 scale per token and KV head")
    m.add_argument("--budget", type=parse_size, default=parse_size("256M"),
                   help="KV-cache memory budget: bytes, or with a suffix like 512M, 2G (default 256M)")
    m.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    m.add_argument("--block-size", type=int, default=16)
    m.add_argument("--only", action="store_true", help="size only the model's own KV-head count")
    m.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="size one of N tensor-parallel ranks: each holds its KV heads / N, so its bytes per token "
                        "and its pool fall by N; the budget is the whole pool, split evenly (KV-head counts N does "
                        "not divide are skipped)")
    m.add_argument("--rss", action="store_true", help="also measure process RSS growth (a fresh process per row)")
    m.set_defaults(func=run_kv_memory)

    h = subparsers.add_parser(
        "head-plan",
        help="label every head on calibration text and write which KV heads keep a full cache (head-aware eviction)",
        description="Runs the model over calibration text with head statistics (as `kvmini attn`), labels every "
        "head, and writes a plan: a KV head keeps its full cache when one of its query heads has a --keep label; "
        "the others keep only what --kv-policy says (`kvmini serve --head-plan PLAN --kv-policy sink_window:4:1020`).",
    )
    h.add_argument("model", type=Path, nargs="?", help="HF-format model directory (default: the SmolLM2 weights)")
    h.add_argument("--out", type=Path, required=True, help="plan file to write (JSON)")
    h.add_argument("--text", type=Path, help="calibration text file (default: the end of Python's language "
                                             "reference, which the perplexity benchmarks do not score)")
    h.add_argument("--tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    h.add_argument("--keep", default=",".join(DEFAULT_KEEP_LABELS),
                   help=f"comma-separated labels whose heads keep a full cache (default: {','.join(DEFAULT_KEEP_LABELS)})")
    h.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    h.set_defaults(func=run_head_plan)


def parse_size(text: str) -> int:
    """'1073741824', '512M', '2G', '1.5GiB' -> bytes (binary multiples)."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes or a suffix: 512M, 2G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


def run_kv_heads(args: argparse.Namespace) -> int:
    from engine.core.config import ModelConfig
    from engine.kv_memory.variants import convert_kv_heads, variant_config, variant_name

    before = ModelConfig.from_dir(args.model)
    after = variant_config(before, args.kv_heads)
    convert_kv_heads(args.model, args.kv_heads, args.out)
    print(f"{args.model} ({variant_name(before)}) -> {args.out} ({variant_name(after)}): "
          f"{before.num_attention_heads} query heads over {after.num_key_value_heads} KV heads")
    return 0


def run_kv_memory(args: argparse.Namespace) -> int:
    from engine.api.llm import parse_dtype
    from engine.exec.shard import check_tensor_parallel
    from engine.kv_memory.sizing import size
    from engine.kv_memory.variants import divisors, variant_config, variant_name

    config, source = _config(args)
    if args.context < 1 or args.block_size < 1:
        raise ValueError("--context and --block-size must be positive")
    ranks = args.tensor_parallel_size
    if args.only:
        check_tensor_parallel(config, ranks)  # the error names the model's numbers and the sizes it allows
    counts = [config.num_key_value_heads] if args.only else divisors(config.num_attention_heads)
    skipped = [kv for kv in counts if kv % ranks]
    if skipped == counts:
        raise ValueError(f"tensor_parallel_size {ranks} divides none of the KV-head counts {counts}: each rank must "
                         f"hold the same number of KV heads")
    dtype = parse_dtype(args.dtype)
    kind = args.dtype if args.kv_cache_dtype == "auto" else f"{args.kv_cache_dtype} (scales float16)"
    print(f"{source}; {kind} cache, block size {args.block_size}, context {args.context}, "
          f"budget {args.budget:,} bytes ({args.budget / 2**20:.1f} MiB)"
          + (f"; per rank of {ranks} tensor-parallel ranks (KV heads / {ranks} each)" if ranks > 1 else ""))
    rows, notes = [], set()
    for kv in counts:
        if kv in skipped:
            continue
        variant = variant_config(config, kv)
        shard, budget = rank_share(variant, ranks, dtype, args)
        r = size(shard, dtype, [args.context], budget, block_size=args.block_size, name=variant_name(variant),
                 measure_rss=args.rss, kv_cache_dtype=args.kv_cache_dtype)
        mark = "*" if kv == config.num_key_value_heads else ""
        c = args.context
        pool = _mib(r.pool_bytes_measured) + (" (meta)" if r.pool_device == "meta" else "")
        line = [r.name + mark, r.bytes_per_token, _mib(r.held_formula[c]), _mib(r.held_measured[c]), pool,
                r.max_seqs_formula[c], r.max_seqs_admitted[c], "yes" if r.exact else "NO"]
        notes |= _notes(r, c)
        rows.append(line + ([_mib(r.rss_growth) if r.rss_growth is not None else "n/a"] if args.rss else []))
    per = "/rank" if ranks > 1 else ""
    headers = ["variant", f"B/token{per}", f"seq MiB{per} (formula)", f"seq MiB{per} (measured)",
               f"1-seq pool MiB{per} (storage)", "max seqs (formula)", "max seqs (admitted)", "exact"] + (
                  [f"RSS growth MiB{per}"] if args.rss else [])
    _print_table(headers, rows)
    for note in sorted(notes):
        print(note)
    if skipped:
        print(f"skipped: {', '.join(f'{kv} KV heads' for kv in skipped)} ({ranks} ranks must divide the KV heads)")
    return 0


def run_head_plan(args: argparse.Namespace) -> int:
    from engine.api.llm import LLM
    from engine.capture.head_stats import LABELS
    from engine.kv_memory.calibrate import calibrate
    from engine.kv_memory.quality import english_text

    keep = tuple(k.strip() for k in args.keep.split(",") if k.strip())
    if not keep or any(k not in LABELS for k in keep):
        raise ValueError(f"--keep takes labels from {', '.join(LABELS)}; got {args.keep!r}")
    if args.tokens < 2:
        raise ValueError("--tokens must be >= 2")
    llm = LLM(args.model, dtype=args.dtype)
    ids = llm.tokenizer.encode(args.text.read_text() if args.text else english_text())
    ids = ids[: args.tokens] if args.text else ids[-args.tokens :]
    plan = calibrate(llm, ids, keep)
    plan.save(args.out)
    c = llm.config
    print(f"{len(ids)} calibration tokens; {plan.num_full} of {c.num_hidden_layers} x {c.num_key_value_heads} KV "
          f"heads keep a full cache ({plan.full_fraction:.0%}): " + " ".join(
              f"L{i}:{len(h)}" for i, h in enumerate(plan.full_kv_heads)))
    print(f"wrote {args.out}")
    return 0


def rank_share(config, ranks: int, dtype, args: argparse.Namespace):
    """The model one of `ranks` tensor-parallel ranks holds, and its share of the budget: the blocks the whole
    budget buys (as `LLM` counts them), of this rank's heads."""
    from engine.exec.shard import rank_config
    from engine.kv_memory.sizing import token_bytes

    if ranks == 1:
        return config, args.budget
    shard = rank_config(config, ranks)
    block = args.block_size
    num_blocks = args.budget // (token_bytes(config, dtype, args.kv_cache_dtype) * block)
    return shard, num_blocks * token_bytes(shard, dtype, args.kv_cache_dtype) * block


def _notes(row, context: int) -> set[str]:
    notes = set()
    if row.pool_device == "meta":
        notes.add("(meta): pool too large to allocate here; its size is read from meta-device tensor storage")
    if row.max_seqs_admitted[context] < row.max_seqs_formula[context] == 1:
        notes.add("admitted 0 where 1 fits: the engine refuses a request whose prompt + max_tokens (here the "
                  "one generated token, whose K/V is never written) needs more blocks than the whole pool")
    return notes


def _config(args: argparse.Namespace):
    from engine.core.config import ModelConfig
    from engine.core.paths import require_default_model
    from engine.kv_memory.sizing import synthetic_config

    shape = (args.layers, args.heads, args.head_dim)
    if any(v is not None for v in shape):
        if args.model is not None:
            raise ValueError("give either a model directory or a synthetic shape (--layers/--heads/--head-dim)")
        if any(v is None for v in shape):
            raise ValueError("a synthetic shape needs all of --layers, --heads and --head-dim")
        kv = args.kv_heads or args.heads
        config = synthetic_config(args.layers, args.heads, kv, args.head_dim)
        return config, f"synthetic: {args.layers} layers, {args.heads} heads / {kv} KV heads, head_dim {args.head_dim}"
    model = args.model or require_default_model()
    config = ModelConfig.from_dir(model)
    if args.kv_heads is not None:
        from engine.kv_memory.variants import variant_config

        config = variant_config(config, args.kv_heads)
    c = config
    return c, f"{model}: {c.num_hidden_layers} layers, {c.num_attention_heads} heads, head_dim {c.head_dim}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def _print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
