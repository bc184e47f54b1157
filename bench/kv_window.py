"""Sink + window eviction on the default model: perplexity and greedy agreement, both position modes and a
window without a sink vs the full cache (engine/kv_memory/window_quality.py). Quality only, no timing beyond
how long each run took.

    python bench/kv_window.py [--sink 4] [--window 252] [--tokens 1024]

Writes bench/results/kv_window.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, english_text, machine, write_json  # noqa: E402
from engine import LLM  # noqa: E402
from engine.cache.kv_policy import KVPolicy  # noqa: E402
from engine.kv_memory.window_quality import measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens scored for perplexity")
    ap.add_argument("--prompts", type=int, default=4, help="text prompts for greedy agreement")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)

    llm = LLM(args.model, dtype="float32")
    text = llm.tokenizer.encode(english_text())
    prefill = args.sink + args.window  # what the window holds: eviction starts right after it
    token_ids = text[: prefill + args.tokens]
    starts = range(len(token_ids), len(token_ids) + args.prompts * args.prompt_tokens, args.prompt_tokens)
    prompts = [text[s : s + args.prompt_tokens] for s in starts]  # text the perplexity run does not score
    policies = [KVPolicy(args.sink, args.window, mode) for mode in ("original", "streaming")]
    # The same number of keys without a sink (the whole sink block goes to the window): what the sink is worth.
    policies.append(KVPolicy(0, policies[0].sink_blocks(llm.blocks.block_size) * llm.blocks.block_size + args.window))
    rows = measure(llm, token_ids, policies, prefill=prefill, prompts=prompts, new_tokens=args.new_tokens)

    print(f"{args.model.name}, float32: perplexity of {args.tokens} tokens after a {prefill}-token prefill, each "
          f"fed alone; greedy agreement with the full cache over {args.new_tokens} tokens after {args.prompts} "
          f"prompts of {args.prompt_tokens} tokens")
    print(f"{'cache':<32} {'perplexity':>10} {'seconds':>8} {'prefix agr.':>11} {'overall agr.':>12}")
    for r in rows:
        agr = "" if r.greedy_prefix is None else f"{r.greedy_prefix:>11.3f} {r.greedy_overall:>12.3f}"
        print(f"{r.policy:<32} {r.perplexity:>10.3f} {r.seconds:>8.1f} {agr}")
    write_json("kv_window", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                          "rows": [dataclasses.asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
