"""A LLaMA-family decoder (Llama, Mistral, Qwen2) in plain PyTorch, reading and writing the paged KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig, RopeScaling
from engine.packed_linear import PackedLinear, can_pack, pack_linear


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


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin `[T, 1, D]` for `apply_rope`, computed once per step for all layers."""
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [T, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).to(dtype).unsqueeze(1), torch.cat((-sin, sin), -1).to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (HF's layout) of x `[T, heads, D]`: `[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`.

    Written as `x * cos + roll(x) * [-sin, sin]`, which rounds exactly like the reference in fewer ops.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP; Q/K/V and gate/up are fused into one matmul each."""

    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.qkv_proj = nn.Linear(c.hidden_size, q + 2 * kv, bias=c.attention_bias)
        self.o_proj = nn.Linear(q, c.hidden_size, bias=c.o_proj_bias)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x, cos, sin, k_pool, v_pool, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        qk = apply_rope(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), cos, sin)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
        attn = paged_attention(q, k, v, k_pool, v_pool, meta, self.index, d**-0.5)
        x = x + self.o_proj(attn)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_pools: list[torch.Tensor] | None,
        v_pools: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm for the flat batch of new tokens."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(positions, self.inv_freq, x.dtype)
        for i, layer in enumerate(self.layers):
            kp = None if k_pools is None else k_pools[i]
            vp = None if v_pools is None else v_pools[i]
            x = layer(x, cos, sin, kp, vp, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied to the embedding
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def pack_weights(self) -> None:
        """Hold every linear layer and the output head in oneDNN's packed layout (see engine/packed_linear.py)."""
        for layer in self.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                setattr(layer, name, pack_linear(getattr(layer, name)))
        # A tied head gets its own packed copy (vocab x hidden more bytes): the embedding lookup needs dense rows.
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.lm_head = PackedLinear(head)

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
    config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device, pack_weights: bool = True
) -> LlamaModel:
    """Allocate the model without random init (meta device), fill it from the checkpoint, pack it for CPU."""
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    model.load_hf_weights(tensors)
    model.eval().requires_grad_(False)
    if pack_weights and can_pack(torch.device(device), dtype):
        model.pack_weights()
    return model
