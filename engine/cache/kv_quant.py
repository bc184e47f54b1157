"""A quantized KV cache: K and V stored in 8 bits with one scale per (token, KV head[, group of dims]).

`kv_cache_dtype`, as in vLLM (`--kv-cache-dtype fp8`) and llama.cpp (`--cache-type-k q8_0`):

* "auto": the model's dtype (no quantization);
* "int8": symmetric, round(x / scale) in [-127, 127], scale = max |x| / 127 over the group;
* "fp8_e4m3": x / scale in float8 e4m3 (3 mantissa bits, up to 448), scale = max |x| / 448.

Scales are float16 (2 bytes). With a group of a whole head (the default), a token of a 64-dim head costs
64 + 2 bytes per K or V head instead of bfloat16's 128: 0.52x. Attention writes new tokens through
`QuantizedPool.write` (quantize) and reads keys through `QuantizedPool.gather` (dequantize into the model's
dtype); a prompt chunk attends to its own fresh K/V before they are quantized, as vLLM's fp8 cache does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
# The largest magnitude each code holds; scales map a group's max |x| onto it.
_CODE_MAX = {"int8": 127.0, "fp8_e4m3": 448.0}
# float16 scales: a group whose max |x| is tiny gets this scale (its values quantize to 0 or near it), never 0.
_MIN_SCALE = 2.0**-24


def check_kv_cache_dtype(name: str) -> str:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return name


def bytes_per_value(kv_cache_dtype: str, model_dtype: torch.dtype, head_dim: int, group_size: int | None) -> float:
    """Cache bytes per K or V element, scales included."""
    if kv_cache_dtype == "auto":
        return torch.empty((), dtype=model_dtype).element_size()
    groups = head_dim // (group_size or head_dim)
    return 1 + groups * SCALE_BYTES / head_dim


@dataclass
class QuantizedPool:
    """One layer's K (or V) pool: 8-bit codes `[blocks, block_size, kv_heads, head_dim]` (uint8 storage) and
    float16 scales `[blocks, block_size, kv_heads, groups]`."""

    codes: torch.Tensor
    scales: torch.Tensor
    kind: str  # "int8" | "fp8_e4m3"
    dtype: torch.dtype  # what `gather` returns: the model's compute dtype

    @classmethod
    def empty(cls, shape: tuple[int, int, int, int], kind: str, dtype: torch.dtype, device, group_size: int | None):
        head_dim = shape[-1]
        group = group_size or head_dim
        if head_dim % group:
            raise ValueError(f"kv cache group size {group} does not divide head_dim {head_dim}")
        codes = torch.zeros(shape, dtype=torch.uint8, device=device)
        scales = torch.zeros((*shape[:-1], head_dim // group), dtype=SCALE_DTYPE, device=device)
        return cls(codes, scales, kind, dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize new tokens' `x` `[T, kv_heads, head_dim]` into cache `slots` `[T]`."""
        codes, scales = quantize(x, self.kind, self.scales.shape[-1])
        kvh, d = x.shape[1], x.shape[2]
        self.codes.view(-1, kvh, d).index_copy_(0, slots, codes)
        self.scales.view(-1, kvh, self.scales.shape[-1]).index_copy_(0, slots, scales)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Tokens at cache `slots` `[..., L]`, dequantized: `[..., L, kv_heads, head_dim]` in `self.dtype`."""
        kvh, d, groups = self.codes.shape[2], self.codes.shape[3], self.scales.shape[-1]
        flat = slots.reshape(-1)
        codes = self.codes.view(-1, kvh, d).index_select(0, flat)
        scales = self.scales.view(-1, kvh, groups).index_select(0, flat)
        return dequantize(codes, scales, self.kind, self.dtype).view(*slots.shape, kvh, d)

    def copy_block(self, src: int, dst: int) -> None:
        self.codes[dst].copy_(self.codes[src])
        self.scales[dst].copy_(self.scales[src])

    def nbytes(self) -> int:
        return self.codes.untyped_storage().nbytes() + self.scales.untyped_storage().nbytes()


def quantize(x: torch.Tensor, kind: str, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[..., head_dim]` -> (uint8 codes `[..., head_dim]`, float16 scales `[..., groups]`)."""
    g = x.float().unflatten(-1, (groups, -1))  # [..., groups, group_size]
    scale = (g.abs().amax(dim=-1, keepdim=True) / _CODE_MAX[kind]).clamp_(min=_MIN_SCALE)
    scale = scale.to(SCALE_DTYPE).float()  # divide by the scale that is stored, so dequantizing inverts it
    y = g / scale
    if kind == "int8":
        codes = y.round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        codes = y.clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.flatten(-2), scale.squeeze(-1).to(SCALE_DTYPE)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 codes `[..., head_dim]` and scales `[..., groups]` -> values `[..., head_dim]` in `dtype`."""
    values = codes.view(torch.int8 if kind == "int8" else torch.float8_e4m3fn).to(dtype)
    groups = scales.shape[-1]
    if groups == 1:
        return values.mul_(scales.to(dtype))
    return values.unflatten(-1, (groups, -1)).mul_(scales.to(dtype).unsqueeze(-1)).flatten(-2)
