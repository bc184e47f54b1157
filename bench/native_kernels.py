"""kvmini's AVX2 int8/int4 kernels (engine/model/native.py) against PyTorch's weight-only ones, in speed and quality.

- speed: µs per call of one layer at SmolLM2's shapes, 1 / 4 / 16 rows of bfloat16 input, kvmini's kernel
  and PyTorch's over the same weights alternating in one process;
- quality on the default model, decode path, each side in its own process (`KVMINI_NATIVE=1` / `0`: a
  layer's kernel is chosen when it is built): the text of bench/kv_memory.py fed one token at a time
  through a session (every row goes through the kernels, as decoding does), perplexity and the argmax
  before each token, compared with bfloat16 dense weights (run once, in the first process).
Writes bench/results/native_kernels.json. Time it on a quiet machine (no other process running).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, english_text, load_average, machine, print_table, us_per_call, write_json  # noqa: E402

SHAPES = {"qkv 576->960": (576, 960), "gate_up 576->3072": (576, 3072), "down 1536->576": (1536, 576),
          "head 576->49152": (576, 49152)}  # (in, out)
ROWS = (1, 4, 16)


def pytorch_kernels(int8: "Int8Linear", int4: "Int4Linear"):  # noqa: F821
    """PyTorch's weight-only kernels over the very weights of kvmini's layers."""
    n, k = int4.out_features, int4.in_features
    packed_codes = int4.codes.view(n, k // 32, 16)
    codes = torch.cat((packed_codes & 15, packed_codes >> 4), dim=-1).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    scales_and_zeros = torch.cat([int4.scale, int4.zero], dim=-1).transpose(0, 1).contiguous()
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, int8.qweight, int8.scales),
            lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros))


def speed(repeats: int, rounds: int = 3) -> dict:
    """µs per call, kvmini's kernel and PyTorch's alternating in this process (`rounds` times each)."""
    from engine.model.quant import Int4Linear, Int8Linear

    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            weight = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
            int8, int4 = Int8Linear(weight, None, torch.bfloat16), Int4Linear(weight, None, torch.bfloat16)
            torch8, torch4 = pytorch_kernels(int8, int4)
            reps = repeats if n < 10000 else max(repeats // 10, 1)
            for rows in ROWS:
                x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
                for kind, ours, theirs in (("int8", int8, torch8), ("int4", int4, torch4)):
                    times = {"native": 0.0, "torch": 0.0}
                    for _ in range(rounds):
                        times["native"] += us_per_call(ours, x, reps, warmup=5) / rounds
                        times["torch"] += us_per_call(theirs, x, reps, warmup=5) / rounds
                    out[f"{kind} {name} x{rows}"] = times
    return out


def fed_one_by_one(model: Path, quantization: str | None, tokens: list[int]) -> dict:
    from engine import LLM

    llm = LLM(model, dtype="bfloat16", quantization=quantization)
    nll, argmax = 0.0, []
    with llm.session(tokens[:1]) as s:
        for t in tokens[1:]:
            [step] = s.feed([t])
            nll -= step.logprobs.logprob
            argmax.append(int(step.logits.argmax()))
    return {"perplexity": math.exp(nll / (len(tokens) - 1)), "argmax": argmax}


def side(args: argparse.Namespace) -> dict:
    """What one process measures (its kernels fixed by KVMINI_NATIVE)."""
    from engine import LLM
    from engine.model.native import native_kernels

    available = native_kernels().available
    result = {"native": available, "speed_us": speed(args.repeats) if args.dense and available else {}, "quality": {}}
    tokens = LLM(args.model, dtype="bfloat16").tokenizer.encode(english_text())[: args.tokens]
    for q in ([None] if args.dense else []) + ["int8", "auto"]:
        result["quality"][q or "bfloat16"] = fed_one_by_one(args.model, q, tokens)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=512, help="tokens of text fed one at a time")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return

    load_start = load_average()
    sides = {}
    for label, flag in (("native", "1"), ("torch", "0")):
        cmd = [sys.executable, __file__, "--side", "--model", str(args.model), "--tokens", str(args.tokens),
               "--repeats", str(args.repeats)] + (["--dense"] if label == "native" else [])
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KVMINI_NATIVE": flag}, check=True)
        sides[label] = json.loads(run.stdout.strip().splitlines()[-1])
    if not sides["native"]["native"]:
        sys.exit("the native kernels are off on this machine: nothing to compare")

    speed_us = sides["native"]["speed_us"]
    speed_rows = [[name, t["torch"], t["native"], t["torch"] / t["native"]] for name, t in speed_us.items()]
    print_table(["layer x rows", "PyTorch µs", "native µs", "speed-up"], speed_rows)
    dense = sides["native"]["quality"]["bfloat16"]
    quality_rows, quality = [["bfloat16 dense", "-", dense["perplexity"], 1.0]], {"bfloat16": dense["perplexity"]}
    for q in ("int8", "auto"):
        for label in ("torch", "native"):
            r = sides[label]["quality"][q]
            agree = sum(a == b for a, b in zip(r["argmax"], dense["argmax"])) / len(dense["argmax"])
            quality_rows.append([q, label, r["perplexity"], agree])
            quality[f"{q} {label}"] = {"perplexity": r["perplexity"], "top1_agreement_with_bfloat16": agree}
    print(f"decode path, {args.tokens} tokens fed one at a time")
    print_table(["weights", "kernel", "perplexity", "top-1 = bfloat16"], quality_rows)
    payload = {"benchmark": "native_kernels", "model": args.model.name, "tokens": args.tokens,
               "machine": machine(), "load_average_start": load_start, "load_average_end": load_average(),
               "speed_us": speed_us,
               "quality": quality}
    print(f"wrote {write_json('native_kernels', payload)}")


if __name__ == "__main__":
    main()
