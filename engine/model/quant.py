"""Weight-only quantized linear layers: int8 per output channel, int4 per group of 32 (CPU decode).

A batch-1 decode step streams every weight once, so fewer weight bytes is fewer milliseconds. Weights are
quantized once at load. The kernels are kvmini's own AVX2 ones (engine/model/native.py): activations rounded to
int8 per group of 32, integer dot products against the weight codes, as llama.cpp does. Where those cannot
be built, PyTorch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`: activations
stay in the model dtype, weights are dequantized inside the product), as gpt-fast and torchao do.
Measurements and quality are in docs/PERFORMANCE.md.

int8: symmetric, one scale per output row: `w ≈ q · s`, q in [-127, 127].
int4: asymmetric, one scale and zero per 32 weights of a row: `w ≈ (q - 8) · s + z`, q in [0, 15]. This is
llama.cpp's Q4_1 grid (`d · q + m`, blocks of 32 along the row), so a checkpoint imported from a Q4_1
GGUF (the default SmolLM2) comes back on the very same grid, up to the bfloat16 rounding of the scales.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.config import ModelConfig
from engine.model.invariance import CHECKED_ROWS
from engine.model.native import native_kernels
from engine.model.packed_linear import run_bucketed

QUANTIZATIONS = ("int8", "int4", "auto")
INT4_GROUP_SIZE = 32
# "auto" keeps a layer in int4 when its weights already sit on a 4-bit grid: the mean rounding error is
# this fraction of a grid step or less (SmolLM2's Q4_1-imported layers: 0.011 after bfloat16 rounding;
# weights of a bfloat16 checkpoint: about 0.25, as uniform rounding gives). Other layers get int8.
AUTO_INT4_MAX_ERROR = 0.05
# PyTorch's weight-only kernels are matrix-vector products: their time grows with every input row (an
# int8 gate_up takes 0.2 ms at 1 row, 2.6 ms at 64, 25 ms at 512), while dequantizing the weight once and
# running a dense matmul costs about 2.5 ms at any row count. Above this many rows (prefill chunks, large
# decode batches) the layers dequantize; at or below it (decode) they stream the small weights. The dense
# path pads its rows as the packed layers do (`run_bucketed`), so that oneDNN compiles and caches a
# bounded number of matmuls; the padding costs little next to the dequantization.
QUANT_MAX_ROWS = 32


def parse_quantization(name: str | None, device: torch.device | str = "cpu") -> str | None:
    """The one check of a `quantization` value: None/"none" (dense weights), "int8", "int4" or "auto"
    (int4 for the layers it represents without loss, int8 for the rest)."""
    if name is None or name == "none":
        return None
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of none, {', '.join(QUANTIZATIONS)}; got {name!r}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantization {name!r} runs on CPU only (PyTorch's CPU kernels); use 'none' on {device}")
    return name


def weight_bytes_per_token(config: ModelConfig, quantization: str | None, dense_bytes: int = 2) -> int:
    """Bytes of weights one decode step streams: every linear layer and the output head (norms and the one
    embedding row are negligible). int8 adds a 2-byte scale per row; int4 a 2-byte scale and zero per 32
    weights, with the head in int8 (see `build_model`); "auto" counts as int4, its case when every layer
    sits on a 4-bit grid."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    rows = q + 2 * kv + h + 2 * i + h  # output rows of qkv, o, gate_up, down
    linear = config.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * i)
    layer_rows = config.num_hidden_layers * rows
    if quantization is None:
        return (linear + v * h) * dense_bytes
    head = v * h + 2 * v  # int8 in both modes
    if quantization == "int8":
        return linear + 2 * layer_rows + head
    return linear // 2 + linear // INT4_GROUP_SIZE * 4 + head


class QuantizedLinear(nn.Module, ABC):
    """What the int8 and int4 layers share: up to QUANT_MAX_ROWS rows through their kernel (`row_fn`, each row
    alone), more rows dense over the dequantized `weight`; subclasses hold the weights and the kernel."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    invariant_rows = 1  # rows per kernel call with each row's result unchanged (engine/model/invariance.py)
    row_check_limit = CHECKED_ROWS  # its time grows with every row: larger calls would gain nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] > QUANT_MAX_ROWS:
            return run_bucketed(self._dense, x)
        return self.row_fn(x2d).view(*x.shape[:-1], self.out_features)

    __call__ = forward  # hot path: skip nn.Module's hook dispatch (these layers take no hooks)

    @abstractmethod
    def row_fn(self, x2d: torch.Tensor) -> torch.Tensor:
        """`x2d` [rows <= QUANT_MAX_ROWS, in] through the layer's own kernel, each row alone."""

    @property
    @abstractmethod
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in], for the dense path."""

    def tile_fn(self, size: int):
        """A prompt tile of `size` rows (engine/model/invariance.py): up to QUANT_MAX_ROWS rows through the kernel,
        as decode rows go; a larger tile dense, over the weight dequantized once for all of a step's tiles and
        padded to `size` rows (a dense product's rounding may depend on its row count)."""
        if size <= QUANT_MAX_ROWS:
            return self.row_fn, False
        weight, bias = self.weight, self.bias
        return (lambda x: F.linear(x, weight, bias)), True

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """`y = x (q · s)^T + b` with int8 `q` `[out, in]` and one scale per output row.

    Its kernel is kvmini's own where it can be built and `in` is a multiple of 32 (`engine.model.native`):
    activations rounded to int8 per group of 32 and integer dot products, as llama.cpp's Q8_0. Otherwise
    PyTorch's `_weight_int8pack_mm` (float activations). `kernel` says which; both compute each row alone."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        # The scale is rounded to the activation dtype first, so q is chosen against the scale the kernel uses.
        self.scales = (w.abs().amax(dim=1).clamp(min=1e-10) / 127).to(act_dtype)
        self.qweight = (w / self.scales.float().unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
        self.bias = None if bias is None else bias.detach().to(act_dtype).contiguous()
        native = native_kernels().available and self.in_features % INT4_GROUP_SIZE == 0
        self.kernel = "native" if native else "torch"

    def row_fn(self, x2d: torch.Tensor) -> torch.Tensor:
        """The kernel at any row count (it streams the int8 weight once per row)."""
        if self.kernel == "native":
            y = torch.ops.kvmini_native.int8_linear(x2d, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2d, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight the kernel multiplies by (for tests and inspection)."""
        return self.qweight.to(self.scales.dtype) * self.scales.unsqueeze(1)


class Int4Linear(QuantizedLinear):
    """`y = x W^T + b` with W as 4-bit codes, a scale and a zero per 32 weights of each row.

    Its kernel is kvmini's own where it can be built (`engine.model.native`): activations rounded to int8 per
    group of 32 and integer dot products against the codes, as llama.cpp's Q4_1 x Q8_1. Otherwise PyTorch's
    `_weight_int4pack_mm_for_cpu` (float activations). `kernel` says which; both compute each row alone."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = n, k = weight.shape
        if not can_int4(weight.shape):
            raise ValueError(f"int4 needs in_features % {INT4_GROUP_SIZE} == 0 and out_features % 16 == 0, "
                             f"got {tuple(weight.shape)}")
        g = weight.detach().float().view(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        low, high = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-10).to(act_dtype)
        zero = (low + 8 * scale.float()).to(act_dtype)  # the kernels' zero is the value of code 8
        codes = ((g - zero.float()) / scale.float() + 8).round_().clamp_(0, 15).to(torch.uint8)
        # Two codes a byte, in the order the native kernel unpacks: byte j of a group holds codes j (low
        # nibble) and j + 16 (high). What `weight` dequantizes too. [out, in / 2]
        half = INT4_GROUP_SIZE // 2
        self.codes = (codes[..., :half] | (codes[..., half:] << 4)).view(n, k // 2)
        self.scales_zeros = torch.cat([scale, zero], dim=-1)  # [out, groups, 2]
        self.scale, self.zero = self.scales_zeros[..., :1], self.scales_zeros[..., 1:]  # [out, groups, 1] views
        self.kernel = "native" if native_kernels().available else "torch"
        if self.kernel == "torch":  # PyTorch's kernel reads its own opaque layout and [groups, out, 2]
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(n, k).int(), 1)
            self.scales_and_zeros = self.scales_zeros.transpose(0, 1).contiguous()
        self.bias = None if bias is None else bias.detach().to(act_dtype).contiguous()

    def row_fn(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            y = torch.ops.kvmini_native.int4_linear(x2d, self.codes, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)
        return y if self.bias is None else y + self.bias

    def grid_error(self, weight: torch.Tensor) -> float:
        """Mean |dequantized - weight| in units of each group's step: ~0 when `weight` was on a 4-bit grid."""
        n, k = weight.shape
        error = (self.weight.float() - weight.float()).abs().view(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        return (error / self.scale.float()).mean().item()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight `(q - 8) * scale + zero`, in the activation dtype."""
        n, k = self.out_features, self.in_features
        packed = self.codes.view(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE // 2)
        codes = torch.cat((packed & 15, packed >> 4), dim=-1)
        return ((codes.to(self.scale.dtype) - 8) * self.scale + self.zero).view(n, k)


def can_int4(shape: torch.Size | tuple[int, int]) -> bool:
    out_features, in_features = shape
    return in_features % INT4_GROUP_SIZE == 0 and out_features % 16 == 0


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantization: str, act_dtype: torch.dtype
) -> nn.Module:
    """An int8 or int4 layer for this weight; int4 falls back to int8 for a shape its kernel cannot take,
    and "auto" keeps int4 only where it loses nothing (`Int4Linear.grid_error`)."""
    if quantization in ("int4", "auto") and can_int4(weight.shape):
        layer = Int4Linear(weight, bias, act_dtype)
        if quantization == "int4" or layer.grid_error(weight) <= AUTO_INT4_MAX_ERROR:
            return layer
    return Int8Linear(weight, bias, act_dtype)


def describe(model: nn.Module) -> str:
    """How many linear layers hold which weights, e.g. "210 int4, 1 int8" (for start-up banners)."""
    names = {Int8Linear: "int8", Int4Linear: "int4"}
    counts: dict[str, int] = {}
    for module in model.modules():
        if type(module) in names:
            counts[names[type(module)]] = counts.get(names[type(module)], 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "dense"
