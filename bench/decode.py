"""Batch-1 greedy decode: 32-token prompt, 128 new tokens, kvmini vs transformers `generate`, same run.

Prints tokens/s for both (median of --repeats runs, the two engines alternating run by run), the ratio,
and the fraction of the memory-bandwidth bound (a decode step must read every weight once: bound =
measured read bandwidth / weight bytes). Writes bench/results/decode.json with every run's figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, english_text, machine, print_table, read_bandwidth_gbs, timed, write_json  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402


def kvmini_runner(model_dir: Path, dtype: str, prompt: list[int], new_tokens: int) -> Callable[[], object]:
    llm = LLM(model_dir, dtype=dtype)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm up
    return lambda: llm.generate(prompt, params)


def transformers_runner(model_dir: Path, dtype: str, prompt: list[int], new_tokens: int) -> Callable[[], object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # fixed length, like ignore_eos
    ids = torch.tensor([prompt])

    def run(n: int):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)

    run(8)  # warm up
    return lambda: run(new_tokens)


def interleaved_tokens_per_s(runs: dict[str, Callable[[], object]], new_tokens: int, repeats: int) -> dict:
    """Alternate the engines run by run, so slow phases of a shared machine hit both alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    return {name: sorted(new_tokens / t for t in ts) for name, ts in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per engine (median reported)")
    args = ap.parse_args()

    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer

    config = ModelConfig.from_dir(args.model)
    prompt = Tokenizer.from_dir(args.model).encode(english_text())[: args.prompt_tokens]
    bandwidth = read_bandwidth_gbs()
    rows, results = [], []
    for dtype in args.dtypes:
        weight_bytes = config.num_parameters() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        bound = bandwidth * 1e9 / weight_bytes
        runs = {
            "kvmini": kvmini_runner(args.model, dtype, prompt, args.new_tokens),
            "transformers": transformers_runner(args.model, dtype, prompt, args.new_tokens),
        }
        speeds = interleaved_tokens_per_s(runs, args.new_tokens, args.repeats)
        ours, ref = statistics.median(speeds["kvmini"]), statistics.median(speeds["transformers"])
        del runs  # free this dtype's models before the next
        results.append(
            {
                "dtype": dtype,
                "kvmini_tokens_per_s": ours,
                "transformers_tokens_per_s": ref,
                "ratio": ours / ref,
                "kvmini_runs_tokens_per_s": speeds["kvmini"],
                "transformers_runs_tokens_per_s": speeds["transformers"],
                "bandwidth_bound_tokens_per_s": bound,
                "kvmini_fraction_of_bound": ours / bound,
                "transformers_fraction_of_bound": ref / bound,
                "weight_bytes": weight_bytes,
            }
        )
        rows.append([dtype, ours, ref, ours / ref, bound, ours / bound])
    print(f"read bandwidth {bandwidth:.1f} GB/s; prompt {args.prompt_tokens} tokens, {args.new_tokens} new, batch 1")
    print_table(["dtype", "kvmini tok/s", "HF tok/s", "ratio", "bound tok/s", "kvmini/bound"], rows)
    payload = {
        "benchmark": "decode",
        "model": str(args.model.name),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "read_bandwidth_gbs": bandwidth,
        "machine": machine(),
        "results": results,
    }
    print(f"wrote {write_json('decode', payload)}")


if __name__ == "__main__":
    main()
