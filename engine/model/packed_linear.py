"""Linear layers whose weights oneDNN re-lays out once at load time, for fast CPU decode.

A decode step multiplies one row per sequence by every weight matrix, so its time is the time to stream
the weights from memory. PyTorch's default CPU path (MKL gemm on the row-major weight) reaches about
11 GB/s on SmolLM2's shapes on a 2-core AVX-512 box; the same bytes in oneDNN's blocked layout stream at
17-27 GB/s (docs/PERFORMANCE.md has the measurements). Inductor's weight freezing and IPEX do the same.
Results equal `F.linear` exactly in bfloat16 and to float32 rounding (a different summation order).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.invariance import DENSE_CHECKED_ROWS

# oneDNN runs these layers and PyTorch's other bfloat16 matmuls on CPU (the quantized layers' dense path,
# prefill attention). It JIT-compiles a primitive for every input shape (0.5-8 ms) and PyTorch keeps them
# in two LRU caches of 1024 entries, oneDNN's own and ideep's (capping one alone frees nothing). At 0.6-1.5
# MB a primitive, a server meeting many prompt lengths and batch sizes grew by ~1 GB until they filled
# (docs/PERFORMANCE.md). 128 entries still hold a step's shapes: five linear, two per prefill segment.
# oneDNN reads both variables when it builds its first primitive, after this import (models are built
# later); a value already in the environment is kept.
ONEDNN_CACHE_CAPACITY = 128
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_name, str(ONEDNN_CACHE_CAPACITY))

# Inputs of more rows than this (prefill chunks) are padded to one of 8 sizes per octave, at most 12.5 %
# more rows, so that prompts of any length share 24 shapes up to 512 rows instead of compiling their own
# (the padded sizes, multiples of 8-64 rows, ran as fast as the exact ones). Decode batches (up to 64
# sequences by default) keep their exact row count.
EXACT_ROWS = 64


def bucket_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of 1/8 of the largest power of two below it: 16 stays, 17 -> 18, 65 -> 72."""
    if rows <= 16:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)
    return -(-rows // step) * step


def run_bucketed(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` computed on x's rows (leading dimensions flattened) zero-padded to `bucket_rows`."""
    x2d = x.reshape(-1, x.shape[-1])
    rows = x2d.shape[0]
    padded = bucket_rows(rows)
    y = linear(x2d if padded == rows else F.pad(x2d, (0, 0, 0, padded - rows)))[:rows]
    return y.view(*x.shape[:-1], y.shape[-1])

# Packing is for CPUs oneDNN drives natively; float16 needs AVX512-FP16, so it keeps the plain path.
_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_LINEAR = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
                   ) -> torch.Tensor:
    return _LINEAR(x, packed, bias, "none", [], "")


def _packed_linear_shape(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


# Inside a compiled decode step (engine/model/compiled.py) the packed product is an opaque op: inductor's own
# lowering of `_linear_pointwise` wants the weight frozen into the graph, which would key the on-disk
# compile cache by the weights' values.
_OPS = torch.library.Library("kvmini", "FRAGMENT")
_OPS.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor")
_OPS.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
torch.library.register_fake("kvmini::packed_linear", _packed_linear_shape, lib=_OPS)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """True when this PyTorch build, CPU and device can run pre-packed oneDNN linear layers."""
    return (
        device.type == "cpu"
        and dtype in _PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and _LINEAR is not None
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and _cpu_packs(dtype)
    )


@functools.cache
def _cpu_packs(dtype: torch.dtype) -> bool:
    """oneDNN packs bfloat16 only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; an AVX2-only CPU (AMD Zen 3)
    refuses at packing time, so a tiny weight is packed once to find out (the rule is oneDNN's, not ours)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """`y = x W^T + b` with W held only in oneDNN's packed layout (no second dense copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # No batch-size hint: oneDNN's default blocked layout measured as fast as the batch-1 one at
        # batch 1 and faster from batch 8 up (docs/PERFORMANCE.md).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().contiguous()

    # Batch invariance (engine/model/invariance.py): rows one call may take with each row's result unchanged,
    # found by `RowCheck` when the model is built (1 until then: one row per call), up to this many.
    invariant_rows = 1
    row_check_limit = DENSE_CHECKED_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > EXACT_ROWS * self.in_features:
            return run_bucketed(self._linear, x)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.kvmini.packed_linear(x, self.packed, self.bias, self.out_features)
        return _LINEAR(x, self.packed, self.bias, "none", [], "")

    row_fn = _linear  # decode rows: the exact row count, at most `invariant_rows` per call

    def tile_fn(self, size: int):
        """A prompt tile's product, and whether the tile is padded to `size` rows (only when this kernel's
        rows are not invariant up to that count)."""
        return self._linear, self.invariant_rows < size

    # Called ~120 times per decoded token: skip nn.Module's hook dispatch (these layers take no hooks).
    __call__ = forward

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight, for inspection (the layer itself keeps only the packed one)."""
        return self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class DenseLinear(nn.Linear):
    """`nn.Linear` with the batch-invariance interface of the other layers (engine/model/invariance.py): the dense
    layer of dtypes or CPUs oneDNN does not pack (float16; bfloat16 without AVX-512), and on GPUs."""

    invariant_rows = 1
    row_check_limit = DENSE_CHECKED_ROWS

    def row_fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def tile_fn(self, size: int):
        return self.row_fn, self.invariant_rows < size

    @classmethod
    def sharing(cls, weight: torch.Tensor) -> "DenseLinear":
        """A bias-free layer over `weight` itself (no copy): a tied output head."""
        with torch.device("meta"):
            layer = cls(weight.shape[1], weight.shape[0], bias=False)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        return layer
