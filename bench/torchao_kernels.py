"""Issue 25 item 2: per-call µs of one linear layer at SmolLM2's shapes (1, 4 and 16 rows, bfloat16 input),
kvmini's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) against bfloat16
`F.linear` and torchao's CPU configs, eager. Opt-in: needs `pip install torchao==0.18.0` (not a dependency).
A config this torchao lacks or refuses is printed and skipped. Writes bench/results/torchao_kernels.json."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_average, machine, us_per_call, write_json  # noqa: E402
from engine.model.quant import Int4Linear, Int8Linear  # noqa: E402

SHAPES = {"gate_up 576->3072": (576, 3072), "down 1536->576": (1536, 576)}  # (in, out)
ROWS = (1, 4, 16)


def torchao_configs() -> dict[str, object]:
    import torchao.quantization as tq

    configs = {"torchao int8 dyn-act int8 weight": tq.Int8DynamicActivationInt8WeightConfig(),
               "torchao int8 weight-only": tq.Int8WeightOnlyConfig()}
    if hasattr(tq, "Int8DynamicActivationInt4WeightConfig"):
        configs["torchao int8 dyn-act int4 weight"] = tq.Int8DynamicActivationInt4WeightConfig(group_size=32)
    else:
        print("torchao has no Int8DynamicActivationInt4WeightConfig")
    configs["torchao int4 weight-only"] = tq.Int4WeightOnlyConfig(group_size=32, int4_packing_format="opaque")
    return configs


def layers(weight: torch.Tensor) -> dict[str, nn.Module]:
    from torchao.quantization import quantize_

    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
    dense.weight.data = weight.to(torch.bfloat16)
    found = {"kvmini int8 (_weight_int8pack_mm)": Int8Linear(dense.weight.data, None, torch.bfloat16),
             "kvmini int4 (_weight_int4pack_mm_for_cpu)": Int4Linear(dense.weight.data, None, torch.bfloat16),
             "bfloat16 F.linear": dense}
    for name, config in torchao_configs().items():
        layer = copy.deepcopy(dense)
        try:
            quantize_(layer, config)
        except Exception as e:  # noqa: BLE001 - a config this build refuses is reported, not fatal
            print(f"{name}: refused ({type(e).__name__}: {str(e)[:120]})")
            continue
        found[name] = layer
    return found


def main() -> None:
    import torchao

    load = load_average()
    torch.manual_seed(0)
    results = {}
    for shape, (k, n) in SHAPES.items():
        for name, layer in layers(torch.randn(n, k) * 0.02).items():
            row = {rows: round(us_per_call(layer, torch.randn(rows, k, dtype=torch.bfloat16)), 1) for rows in ROWS}
            results[f"{shape} | {name}"] = row
            print(f"{shape} | {name}: " + ", ".join(f"{r} rows {us} µs" for r, us in row.items()), flush=True)
    print(f"load average {load:.2f} at the start")
    payload = {"benchmark": "torchao_kernels", "torchao": torchao.__version__, "load_average_1m": load,
               "machine": machine(), "us_per_call_by_rows": results}
    print(f"wrote {write_json('torchao_kernels', payload)}")


if __name__ == "__main__":
    main()
