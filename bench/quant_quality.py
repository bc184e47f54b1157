"""What weight quantization costs in quality: perplexity and greedy agreement against bfloat16.

Perplexity on the fixed text of bench/kv_memory.py (the first --ppl-tokens tokens, windows of 1024);
greedy agreement over --new-tokens tokens from --prompts prompts cut from the same text: `prefix` (the
fraction of positions before the first differing token), `overall` (same token at the same position)
and `forced_top1` (the quantized model's argmax given bfloat16's own tokens). Writes
bench/results/quant_quality.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, english_text, machine, print_table, write_json  # noqa: E402
from engine import LLM  # noqa: E402
from engine.kv_memory.quality import compare, greedy, perplexity  # noqa: E402
from engine.model.quant import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--quantizations", nargs="+", default=["int8", "int4", "auto"])
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()

    base = LLM(args.model, dtype="bfloat16")
    text = base.tokenizer.encode(english_text())
    prompts = [text[i * 1000 : i * 1000 + 32] for i in range(args.prompts)]
    reference = greedy(base, prompts, args.new_tokens)
    base_ppl = perplexity(base, text[: args.ppl_tokens]).value
    rows = [["bfloat16", "dense", base_ppl, 0.0, 1.0, 1.0, 1.0]]
    results = [{"quantization": None, "layers": "dense", "perplexity": base_ppl}]
    for q in args.quantizations:
        llm = LLM(args.model, dtype="bfloat16", quantization=q)
        ppl = perplexity(llm, text[: args.ppl_tokens]).value
        agree = compare(llm, prompts, reference)
        change = ppl / base_ppl - 1
        rows.append([q, describe(llm.model), ppl, 100 * change, agree.prefix, agree.overall, agree.forced_top1])
        results.append({"quantization": q, "layers": describe(llm.model), "perplexity": ppl,
                        "perplexity_change": change, "greedy_prefix": agree.prefix,
                        "greedy_overall": agree.overall, "forced_top1": agree.forced_top1})
        del llm
    print(f"perplexity over {args.ppl_tokens} tokens; greedy agreement over {args.prompts} prompts x "
          f"{args.new_tokens} tokens, against bfloat16")
    print_table(["weights", "layers", "perplexity", "change %", "prefix", "overall", "forced top-1"], rows)
    payload = {"benchmark": "quant_quality", "model": args.model.name, "ppl_tokens": args.ppl_tokens,
               "prompts": args.prompts, "new_tokens": args.new_tokens, "machine": machine(), "results": results}
    print(f"wrote {write_json('quant_quality', payload)}")


if __name__ == "__main__":
    main()
