"""The two kernel choices behind kvmini's CPU speed, measured on this machine.

1. Linear layers at decode: `F.linear` (PyTorch's default MKL path) against oneDNN-packed weights
   (engine/model/packed_linear.py), on SmolLM2-135M's weight shapes, one input row, weights cold in cache
   (30 copies per shape are cycled, as the 30 layers are). Prints GB/s of weights streamed.
2. Batched decode attention: 64 sequences of one length gathered and attended as one batch against
   smaller batches (what engine/model/attention.py's group_by_length produces).

Writes bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, print_table, write_json  # noqa: E402
from engine.model.packed_linear import PackedLinear  # noqa: E402

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, MLP 1536, vocabulary 49152.
SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}


def per_call_us(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def linear_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        copies = 2 if out_f > 10_000 else 30
        weights = [torch.randn(out_f, in_f).to(dtype) for _ in range(copies)]
        packed = [PackedLinear(w) for w in weights]
        x = torch.randn(1, in_f).to(dtype)
        turn = iter(range(10**9))
        plain_us = per_call_us(lambda: F.linear(x, weights[next(turn) % copies]), 60)
        packed_us = per_call_us(lambda: packed[next(turn) % copies](x), 60)
        nbytes = out_f * in_f * x.element_size()
        rows.append({"dtype": str(dtype).removeprefix("torch."), "layer": name, "shape": [out_f, in_f],
                     "f_linear_us": plain_us, "packed_us": packed_us, "f_linear_gbs": nbytes / plain_us / 1e3,
                     "packed_gbs": nbytes / packed_us / 1e3, "speedup": plain_us / packed_us})
    return rows


def attention_rows(dtype: torch.dtype, context: int, seqs: int = 64) -> list[dict]:
    kvh, group, d, bs = 3, 3, 64, 16
    blocks = seqs * -(-context // bs) + 64
    k_pool = torch.randn(blocks, bs, kvh, d).to(dtype)
    v_pool = torch.randn(blocks, bs, kvh, d).to(dtype)
    table = torch.randperm(blocks)[: seqs * -(-context // bs)].view(seqs, -1)
    slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).view(seqs, -1)[:, :context]
    q = torch.randn(seqs, kvh, group, d).to(dtype)

    def attend(batch: int):
        for s in range(0, seqs, batch):
            sl = slots[s : s + batch].reshape(-1)
            n = min(batch, seqs - s)
            k = k_pool.view(-1, kvh, d).index_select(0, sl).view(n, context, kvh, d).transpose(1, 2)
            v = v_pool.view(-1, kvh, d).index_select(0, sl).view(n, context, kvh, d).transpose(1, 2)
            F.scaled_dot_product_attention(q[s : s + batch], k, v, scale=d**-0.5)

    return [{"dtype": str(dtype).removeprefix("torch."), "sequences": seqs, "context": context, "batch": b,
             "keys_per_batch": b * context, "ms_per_layer": per_call_us(lambda: attend(b), 5) / 1e3}
            for b in (64, 16, 4, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    linear, attention = [], []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        linear += linear_rows(dtype)
        attention += attention_rows(dtype, context=1000)
    print("linear layers, one input row, weights cold (GB/s = weight bytes streamed per second)")
    print_table(["dtype", "layer", "F.linear us", "packed us", "F.linear GB/s", "packed GB/s", "speedup"],
                [[r["dtype"], r["layer"], r["f_linear_us"], r["packed_us"], r["f_linear_gbs"], r["packed_gbs"],
                  r["speedup"]] for r in linear])
    print("\ndecode attention of 64 sequences x 1000 keys, per layer, by batch size")
    print_table(["dtype", "batch", "keys per batch", "ms per layer"],
                [[r["dtype"], r["batch"], r["keys_per_batch"], r["ms_per_layer"]] for r in attention])
    path = write_json("kernels", {"benchmark": "kernels", "machine": machine(), "linear": linear,
                                  "decode_attention": attention})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
