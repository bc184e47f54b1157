"""kvmini's own int8/int4 kernels (engine/model/csrc/quant_mm.cpp): their arithmetic, row independence, shape checks,
and the fallback to PyTorch's kernels when they are turned off or cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.model.native import CPU_CAPABILITIES, native_kernels
from engine.model.quant import INT4_GROUP_SIZE, Int4Linear, Int8Linear
from tests.test_quant import reference

LAYERS = {"int8": Int8Linear, "int4": Int4Linear}

# These exercise kvmini's kernels themselves; where they are off (no AVX2, no compiler, KVMINI_NATIVE=0) the
# layers run PyTorch's kernels, which tests/test_quant.py covers, and the fallback test below still runs.
needs_native = pytest.mark.skipif(not native_kernels().available,
                                  reason=f"kvmini's int8/int4 kernels are off here ({native_kernels().reason}); "
                                         "the PyTorch kernels the layers use instead are tested by tests/test_quant.py")


def layer_and_input(kind: str, n: int, k: int, rows: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layer = LAYERS[kind]((torch.randn(n, k, generator=g) * 0.05).to(dtype), None, dtype)
    return layer, torch.randn(rows, k, generator=g).to(dtype) * 3


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 32), (96, 128), (48, 1536)])
def test_kernel_computes_int8_activations_times_the_weight_grid(kind, dtype, shape):
    layer, x = layer_and_input(kind, *shape, rows=7, dtype=dtype)
    assert layer.kernel == "native"
    x[0, :INT4_GROUP_SIZE] = 0  # an all-zero group: scale 0, no division by zero
    y, ref = layer(x).double(), reference(x, layer)
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((y - ref).abs() <= rtol * ref.abs() + rtol * ref.abs().max()).all()
    # and close to the float product: the activations' int8 rounding is about 0.5 % of a dot product
    exact = x.double() @ layer.weight.double().t()
    assert ((y - exact).norm() / exact.norm()).item() < 0.02


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_row_is_the_same_alone_and_in_any_batch(kind):
    layer, x = layer_and_input(kind, 96, 256, rows=16, dtype=torch.bfloat16)
    batched = layer(x)
    for rows in (1, 2, 3, 5, 7, 16):  # whole and partial blocks of four rows
        assert torch.equal(layer(x[:rows]), batched[:rows])
    for r in range(16):
        assert torch.equal(layer(x[r : r + 1]), batched[r : r + 1])


@needs_native
def test_shapes_and_dtypes_are_checked():
    ops = torch.ops.kvmini_native
    layer, x = layer_and_input("int4", 16, 64, rows=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="int4_linear: shapes do not match"):
        ops.int4_linear(x[:, :32], layer.codes, layer.scales_zeros)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        ops.int4_linear(x.half(), layer.codes, layer.scales_zeros)
    with pytest.raises(RuntimeError, match="codes must be uint8"):
        ops.int4_linear(x, layer.codes.to(torch.int8), layer.scales_zeros)
    layer8, _ = layer_and_input("int8", 16, 64, rows=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="int8_linear: shapes do not match"):
        ops.int8_linear(x, layer8.qweight, layer8.scales[:8])
    with pytest.raises(RuntimeError, match="weight must be int8"):
        ops.int8_linear(x, layer8.qweight.float(), layer8.scales)


def test_int8_keeps_pytorchs_kernel_where_the_rows_do_not_split_into_groups_of_32():
    layer, x = layer_and_input("int8", 16, 48, rows=3, dtype=torch.float32)
    assert layer.kernel == "torch"
    torch.testing.assert_close(layer(x), x @ layer.weight.t(), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_compiler_sees_an_opaque_op(kind):
    layer, x = layer_and_input(kind, 32, 64, rows=3, dtype=torch.float32)
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x) * 2, rtol=0, atol=0)


@pytest.mark.parametrize("env, said", [
    ({"KVMINI_NATIVE": "0"}, ""),  # asked for: nothing to say
    pytest.param({"CXX": "false", "KVMINI_NATIVE": "1"}, "could not build or load", marks=pytest.mark.skipif(
        torch.backends.cpu.get_cpu_capability() not in CPU_CAPABILITIES,
        reason="without AVX2 the kernels are never built, so a failing compiler is never reached")),
])
def test_off_or_unbuildable_falls_back_to_pytorchs_kernel(tmp_path, env, said):
    script = ("import torch; from engine.model.quant import Int4Linear; "
              "l = Int4Linear(torch.randn(32, 64), None, torch.float32); x = torch.randn(2, 64); "
              "assert torch.allclose(l(x), x @ l.weight.t(), atol=1e-4); print(l.kernel)")
    run_env = {**os.environ, "KVMINI_HOME": str(tmp_path), **env}  # an empty home: nothing built yet
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=run_env, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    assert not said or said in result.stderr and "int4 layers use PyTorch's kernel" in result.stderr
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
