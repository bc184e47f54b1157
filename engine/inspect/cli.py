"""`kvmini attn`: run a prompt or the induction probe (or read a dump), label the heads, write the report.

Also runnable on its own: `python -m engine.inspect.cli attn ...`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from pathlib import Path


def add_subcommands(subparsers) -> None:
    """Register this feature's subcommands."""
    a = subparsers.add_parser(
        "attn", help="attention patterns: label every head, write an HTML report, PNGs or a dump",
        description="Record where every head attends over a decoding run (or the induction probe), label the "
                    "heads, and write a self-contained HTML report. See docs/ATTENTION.md.")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text: forced token by token, then decoded greedily")
    src.add_argument("--probe", action="store_true", help="BOS + k random tokens twice (induction probe)")
    src.add_argument("--dump", type=Path, metavar="FILE", help="read a saved dump instead of running a model")
    a.add_argument("--model", type=Path, help="HF-format model directory (default: the imported SmolLM2)")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    a.add_argument("--max-tokens", type=int, default=16, help="tokens to generate after the prompt (default 16)")
    a.add_argument("--probe-length", type=int, default=50, help="random tokens per copy in the probe (default 50)")
    a.add_argument("--seed", type=int, default=0, help="seed of the probe's random tokens")
    a.add_argument("--layers", type=index_list, help="layers to capture, e.g. 0,3,10-12 (default: all)")
    a.add_argument("--heads", type=index_list, help="query heads to capture, e.g. 0-2 (default: all)")
    a.add_argument("--top-k", type=int, help="store only the k largest probabilities of each row (and the rest)")
    a.add_argument("--window", type=int, default=4, help="local-window size for the statistics (default 4)")
    a.add_argument("--threshold", type=float, default=0.4, help="score that earns a pattern label (default 0.4)")
    a.add_argument("--diffuse", type=float, default=0.7, help="normalised entropy for 'diffuse' (default 0.7)")
    a.add_argument("--out", type=Path, metavar="HTML", help="write the HTML report here")
    a.add_argument("--png", type=Path, metavar="DIR", help="write PNG heatmaps here (needs matplotlib)")
    a.add_argument("--save-dump", type=Path, metavar="FILE", help="save the recorded run (.safetensors)")
    a.add_argument("--span", type=span_arg, action="append", dest="spans", metavar="NAME:START:END",
                   help="a span of the prompt, token positions START..END-1 (repeatable; spans must lie in the "
                        "prompt and not overlap): the report shows each step's attention on it")
    a.set_defaults(func=run_attn)


def index_list(text: str) -> tuple[int, ...]:
    """'0,3,10-12' -> (0, 3, 10, 11, 12)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected indices like 0,3,10-12, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"no indices in {text!r}")
    return tuple(dict.fromkeys(out))


def span_arg(text: str) -> dict:
    """'doc1:0:40' -> {"name": "doc1", "start": 0, "end": 40} (the name may itself hold colons)."""
    parts = text.rsplit(":", 2)
    try:
        name, start, end = parts[0], int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"expected NAME:START:END with token positions, got {text!r}") from None
    if not name:
        raise argparse.ArgumentTypeError(f"span {text!r} has no name")
    if start < 0 or end <= start:
        raise argparse.ArgumentTypeError(f"span {text!r}: need 0 <= START < END (END is exclusive)")
    return {"name": name, "start": start, "end": end}


def check_spans(spans: list[dict] | None, prompt_len: int) -> list[dict]:
    """Spans must lie in the prompt's `prompt_len` tokens, have distinct names and not overlap."""
    spans = list(spans or [])
    for sp in spans:
        if sp["end"] > prompt_len:
            raise ValueError(f"span {sp['name']} [{sp['start']}, {sp['end']}) is not inside the prompt "
                             f"(positions 0..{prompt_len - 1}, {prompt_len} tokens)")
    names = [sp["name"] for sp in spans]
    if len(set(names)) != len(names):
        raise ValueError(f"span names must be distinct, got {', '.join(names)}")
    ordered = sorted(spans, key=lambda sp: sp["start"])
    for a, b in itertools.pairwise(ordered):
        if b["start"] < a["end"]:
            raise ValueError(f"spans {a['name']} [{a['start']}, {a['end']}) and {b['name']} "
                             f"[{b['start']}, {b['end']}) overlap")
    return spans


def run_attn(args: argparse.Namespace) -> int:
    from engine.capture.head_labels import Thresholds
    from engine.inspect.dump import load_dump, save_dump

    thresholds = Thresholds(args.threshold, args.diffuse)  # checked before any model work
    if args.png is not None:
        from engine.inspect.png import require_matplotlib

        require_matplotlib()
    if args.dump is not None:
        if args.layers or args.heads or args.top_k:
            raise ValueError("--layers, --heads and --top-k shape a recording; a dump holds what it was saved with")
        dump = load_dump(args.dump)
        if getattr(args, "spans", None):  # spans are a way to read the rows: they can be given afresh
            dump.info = {**dump.info, "spans": check_spans(args.spans, dump.prompt_len)}
    else:
        dump = _record(args)
    _print_summary(dump, thresholds)
    if args.save_dump is not None:
        save_dump(dump, args.save_dump)
        print(f"wrote {args.save_dump} ({_size(args.save_dump)})")
    if args.out is not None:
        from engine.inspect.report import write_report

        write_report(dump, args.out, thresholds=thresholds)
        print(f"wrote {args.out} ({_size(args.out)})")
    if args.png is not None:
        from engine.inspect.png import write_pngs

        for path in write_pngs(dump, args.png):
            print(f"wrote {path}")
    return 0


def _record(args: argparse.Namespace):
    from engine.api.llm import LLM
    from engine.capture.request import AttentionCapture

    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    capture = AttentionCapture(layers=args.layers, heads=args.heads)
    capture.validate(llm.config.num_hidden_layers, llm.config.num_attention_heads)
    kwargs = {"top_k": args.top_k, "window": args.window}
    info = {"model": str(llm.model_dir), "dtype": args.dtype}
    spans = getattr(args, "spans", None)
    if args.probe:
        from engine.inspect.probe import Probe, run_probe

        probe = Probe(args.probe_length, args.seed)
        if spans:
            info["spans"] = check_spans(spans, len(probe.token_ids(llm)))
        return run_probe(llm, probe, capture, info=info, **kwargs)
    from engine.inspect.recorder import record_prompt

    if args.chat:
        ids = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        ids = llm.tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    info |= {"source": "prompt", "chat": args.chat, "max_tokens": args.max_tokens}
    if spans:
        info["spans"] = check_spans(spans, len(ids))  # before the model runs
    return record_prompt(llm, ids, capture, max_tokens=args.max_tokens, info=info, **kwargs)


def _print_summary(dump, thresholds) -> None:
    from engine.capture.head_labels import label_heads, top_heads

    stats = dump.stats if dump.stats is not None else dump.recompute_stats()
    labels = label_heads(stats, thresholds)
    print(f"{len(dump.token_ids)} tokens ({dump.prompt_len} given), {dump.num_steps} rows, "
          f"{len(stats.layers)} layers x {len(stats.heads)} heads ({dump.n_kv_heads} KV heads)")
    counts = Counter(lab.label for lab in labels)
    print("labels: " + ", ".join(f"{name} {n}" for name, n in counts.most_common()))
    second = Counter(lab.secondary for lab in labels if lab.secondary is not None)
    if second:
        print("secondary: " + ", ".join(f"{name} {n}" for name, n in second.most_common()))
    by_head = {(lab.layer, lab.head): lab for lab in labels}
    for name, title in (("induction", "induction"), ("copying", "copying"), ("duplicate", "duplicate"),
                        ("positional", "positional"), ("prev", "previous-token"), ("long_range", "long-range"),
                        ("syntax", "separators"), ("global", "global columns"), ("sink", "first-token")):
        tops = []
        for layer, head, v in top_heads(stats, name, 5):
            lab = by_head[(layer, head)]
            extra = ""
            if name == "positional":
                extra = f" @-{lab.detail['offset']}"
            elif name == "global" and lab.detail["global_columns"]:
                extra = " @" + "+".join(str(c["position"]) for c in lab.detail["global_columns"][:3])
            tops.append(f"L{layer}H{head} {v:.3f}{extra} ({lab.label})")
        print(f"top {title}: {', '.join(tops)}")


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point with the same error handling as `kvmini`."""
    parser = argparse.ArgumentParser(prog="kvmini")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"kvmini: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
