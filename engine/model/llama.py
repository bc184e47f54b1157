"""A LLaMA-family decoder (Llama, Mistral, Qwen2) in plain PyTorch, reading and writing the paged KV cache."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.config import ModelConfig, RopeScaling
from engine.model.attention import AttentionMetadata, paged_attention
from engine.model.invariance import CHECKED_ROWS, RowCheck, RowPlan, apply_plan, run_rows
from engine.model.packed_linear import DenseLinear, PackedLinear, can_pack
from engine.model.quant import quantize_linear

if TYPE_CHECKING:
    from engine.core.comm import TensorParallel

log = logging.getLogger("kvmini.model")

LINEAR_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ROPE_TABLE_START = 4096  # positions the RoPE table holds at load (it doubles when a longer sequence comes)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference does, then scale in the model dtype (bit-identical to it).
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # The reference's formula, op for op (F.rms_norm adds scalar-tensor copies that cost more here).
        xf = x.float()
        variance = xf.pow(2).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(variance.add_(self.eps))).to(x.dtype)

    __call__ = forward  # hot path (2 per layer per step): skip nn.Module's hook dispatch


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's scaling: low frequencies slowed by `factor`, high kept, a smooth blend between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RopeTable:
    """cos and signed sin `[positions, D]` of every position, computed once at load (and grown on demand),
    so a step only gathers its rows. The same float32 formula as the reference, then rounded to `dtype`."""

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype, length: int):
        self.inv_freq, self.dtype = inv_freq, dtype
        self._grow(length)

    def _grow(self, length: int) -> None:
        freqs = torch.arange(length, device=self.inv_freq.device).float().unsqueeze(1) * self.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        self.cos = torch.cat((cos, cos), -1).to(self.dtype)
        self.signed_sin = torch.cat((-sin, sin), -1).to(self.dtype)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[T, 1, D]` cos and signed sin for `apply_rope` (`max_position`: the largest of `positions`)."""
        if max_position >= self.cos.shape[0]:
            # A power of two: the vectorized cos/sin then cover every row with no scalar tail, so a grown
            # table holds the old rows bit for bit (batch invariance, engine/model/invariance.py).
            self._grow(1 << max(2 * self.cos.shape[0] - 1, max_position).bit_length())
        return self.cos.index_select(0, positions).unsqueeze(1), self.signed_sin.index_select(0, positions).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (HF's layout) of x `[T, heads, D]`: `[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`.

    Written as `x * cos + roll(x) * [-sin, sin]`, which rounds exactly like the reference in fewer ops.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def linear(layer, x: torch.Tensor, plan: RowPlan | None) -> torch.Tensor:
    """`layer(x)`, or with batch invariance each row as `plan` lays it out (engine/model/invariance.py)."""
    return layer(x) if plan is None else apply_plan(layer, x, plan)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP; Q/K/V and gate/up are fused into one matmul each.

    Under tensor parallelism (engine/exec) the layer holds one rank's slice: its query and KV heads and its
    rows of gate/up (column-parallel), the matching input columns of o/down (row-parallel), whose partial sums
    `tp.all_reduce` adds up over the ranks."""

    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.tp: TensorParallel | None = None  # set by engine/exec/shard.py load_rank
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.qkv_proj = DenseLinear(c.hidden_size, q + 2 * kv, bias=c.attention_bias)
        self.o_proj = DenseLinear(q, c.hidden_size, bias=c.o_proj_bias)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_up_proj = DenseLinear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = DenseLinear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x, cos, sin, k_pool, v_pool, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        plan = meta.row_plan
        qkv = linear(self.qkv_proj, self.input_layernorm(x), plan)
        qk = apply_rope(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), cos, sin)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
        attn = paged_attention(q, k, v, k_pool, v_pool, meta, self.index, d**-0.5)
        out = linear(self.o_proj, attn, plan)
        if self.tp is not None:
            self.tp.all_reduce(out)
        x = x + out
        gate, up = linear(self.gate_up_proj, self.post_attention_layernorm(x), plan).chunk(2, dim=-1)
        out = linear(self.down_proj, F.silu(gate) * up, plan)
        if self.tp is not None:
            self.tp.all_reduce(out)
        return x + out

    __call__ = forward  # hot path (one call per layer per step): skip nn.Module's hook dispatch


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else DenseLinear(config.hidden_size, config.vocab_size, bias=False)
        self.rope: RopeTable | None = None  # built by `build_model` once the device and dtype are known
        # Tensor parallelism: the embedding and the head hold this rank's rows of the vocabulary (engine/exec).
        self.tp: TensorParallel | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_pools: list[torch.Tensor] | None,
        v_pools: list[torch.Tensor] | None,
        max_position: int,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm for the flat batch of new tokens
        (`max_position`: the largest of `positions`, known to the caller without a device sync)."""
        if self.tp is None:
            x = F.embedding(input_ids, self.embed_tokens.weight)
        else:
            x = self.tp.embed(input_ids, self.embed_tokens.weight)
        cos, sin = self.rope.lookup(positions, max_position)
        return self.forward_layers(x, cos, sin, meta, k_pools, v_pools)

    def forward_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, k_pools, v_pools
                       ) -> torch.Tensor:
        """Every layer and the final norm over embedded `x` `[T, hidden]` with its rows' RoPE `cos`/`sin`
        (`meta`: AttentionMetadata, or GraphDecodeMeta inside a compiled step)."""
        for i, layer in enumerate(self.layers):
            kp = None if k_pools is None else k_pools[i]
            vp = None if v_pools is None else v_pools[i]
            x = layer(x, cos, sin, kp, vp, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, invariant: bool = False) -> torch.Tensor | None:
        """Float32 logits `[rows, vocab]`; under tensor parallelism every rank computes its vocabulary rows and
        rank 0 gets them all (the other ranks get None). `invariant`: each row's logits as it has them alone
        (at most the head's `invariant_rows` rows per call, engine/model/invariance.py)."""
        head = self.output_head
        logits = (run_rows(head.row_fn, hidden, head.invariant_rows) if invariant else head(hidden)).float()
        return logits if self.tp is None else self.tp.gather_logits(logits)

    @property
    def output_head(self) -> nn.Module:
        """The output layer: `lm_head`, or for a tied checkpoint a layer over the embedding itself."""
        if self.lm_head is not None:
            return self.lm_head
        head = self.__dict__.get("_tied_head")
        if head is None or head.weight is not self.embed_tokens.weight:
            # Kept out of the module tree (not a submodule): its one parameter is the embedding's.
            head = self.__dict__["_tied_head"] = DenseLinear.sharing(self.embed_tokens.weight)
        return head

    def linears(self) -> list[nn.Module]:
        """Every linear layer, the output head last."""
        return [getattr(layer, name) for layer in self.layers for name in LINEAR_NAMES] + [self.output_head]

    def check_rows(self, check: RowCheck) -> None:
        """Set every linear layer's `invariant_rows` (engine/model/invariance.py): one check per kind and shape.
        A kernel whose rounding moves with the row count runs its decode rows one per call: invariant, slower,
        and said in the log."""
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        head = self.output_head
        for lin in self.linears():
            # The head takes the sampled rows (at most max_num_seqs): checked to 64 rows, like the quantized
            # kernels, whose time grows with every row anyway; dense layers to a whole prompt chunk.
            limit = CHECKED_ROWS if lin is head else lin.row_check_limit
            key = (type(lin).__name__, lin.out_features, lin.in_features, lin.bias is not None, dtype, limit)
            lin.invariant_rows = check.invariant_rows(key, lin.row_fn, lin.in_features, dtype, device, limit)
        if slow := check.moving_kernels():
            log.warning("batch invariance: on this CPU the rounding of %s depends on the row count; their decode "
                        "rows run one per call (invariant, slower)", ", ".join(slow))

    def replace_linears(self, make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module], make_head=None) -> None:
        """Rebuild every linear layer with `make(weight, bias)` and the output head with `make_head(weight,
        None)` (default: `make`), to pack or quantize them.

        A tied head gets its own copy (vocab x hidden more weights): the embedding lookup needs dense rows."""
        for layer in self.layers:
            for name in LINEAR_NAMES:
                linear = getattr(layer, name)
                setattr(layer, name, make(linear.weight, linear.bias))
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.lm_head = (make_head or make)(head, None)

    @torch.no_grad()
    def load_hf_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up as they go."""
        self.embed_tokens.weight.copy_(tensors["model.embed_tokens.weight"])
        self.norm.weight.copy_(tensors["model.norm.weight"])
        if self.lm_head is not None:
            self.lm_head.weight.copy_(tensors["lm_head.weight"])
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layer.input_layernorm.weight.copy_(tensors[p + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(tensors[p + "post_attention_layernorm.weight"])
            _load_linear(layer.qkv_proj, tensors, [a + n + "_proj" for n in "qkv"])
            _load_linear(layer.o_proj, tensors, [a + "o_proj"])
            _load_linear(layer.gate_up_proj, tensors, [m + "gate_proj", m + "up_proj"])
            _load_linear(layer.down_proj, tensors, [m + "down_proj"])


def _load_linear(linear: nn.Linear, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """Fill a (possibly fused) linear layer from HF tensors stacked along the output dimension."""
    linear.weight.copy_(torch.cat([tensors[n + ".weight"] for n in names]))
    if linear.bias is not None:
        linear.bias.copy_(torch.cat([tensors[n + ".bias"] for n in names]))


def build_model(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device,
    pack_weights: bool = True,
    quantization: str | None = None,
    batch_invariant: bool = False,
) -> LlamaModel:
    """Allocate the model without random init (meta device), fill it from the checkpoint, then quantize its
    linear layers (`quantization` "int8", "int4" or "auto", see engine/model/quant.py) or pack them for CPU.
    `batch_invariant`: check how many rows each layer's kernel takes at once with unchanged results."""
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device=device).to(dtype)
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    model.rope = RopeTable(inv_freq, dtype, min(config.max_position_embeddings, ROPE_TABLE_START))
    model.load_hf_weights(tensors)
    model.eval().requires_grad_(False)
    if quantization is not None:
        # The output head stays int8 under int4 (as llama.cpp keeps output.weight at 6+ bits): it is the
        # most sensitive matrix, 4 bits cost SmolLM2 5 % perplexity there, and 8 bits cost 0.3 %.
        model.replace_linears(lambda w, b: quantize_linear(w, b, quantization, dtype),
                              lambda w, b: quantize_linear(w, b, "int8", dtype))
    elif pack_weights and can_pack(torch.device(device), dtype):
        model.replace_linears(PackedLinear)
    if batch_invariant:
        model.check_rows(RowCheck())
    return model
