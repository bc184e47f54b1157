"""Linear layers whose weights oneDNN re-lays out once at load time, for fast CPU decode.

A decode step multiplies one row per sequence by every weight matrix, so its time is the time to stream
the weights from memory. PyTorch's default CPU path (MKL gemm on the row-major weight) reaches about
11 GB/s on SmolLM2's shapes on a 2-core AVX-512 box; the same bytes in oneDNN's blocked layout stream at
17-27 GB/s (docs/PERFORMANCE.md has the measurements). Inductor's weight freezing and IPEX do the same.
Results equal `F.linear` exactly in bfloat16 and to float32 rounding (a different summation order).
"""

from __future__ import annotations

import torch
from torch import nn

# Packing is for CPUs oneDNN drives natively; float16 needs AVX512-FP16, so it keeps the plain path.
_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_LINEAR = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """True when this PyTorch build and device can run pre-packed oneDNN linear layers."""
    return (
        device.type == "cpu"
        and dtype in _PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and _LINEAR is not None
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """`y = x W^T + b` with W held only in oneDNN's packed layout (no second dense copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # No batch-size hint: oneDNN's default blocked layout measured as fast as the batch-1 one at
        # batch 1 and faster from batch 8 up (docs/PERFORMANCE.md).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LINEAR(x, self.packed, self.bias, "none", [], "")

    # Called ~120 times per decoded token: skip nn.Module's hook dispatch (these layers take no hooks).
    __call__ = forward

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight, for inspection (the layer itself keeps only the packed one)."""
        return self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
