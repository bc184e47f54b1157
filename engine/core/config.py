"""Model configuration read from an HF-format `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` divides positions, `llama3` rescales low frequencies."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always; Llama when set, then on o too)
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def o_proj_bias(self) -> bool:
        """HF's Llama puts a bias on the output projection too when `attention_bias` is set; Qwen2 does not."""
        return self.attention_bias and self.architecture == "LlamaForCausalLM"

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA, num_attention_heads for MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Cache bytes one token costs: K and V, every layer, every KV head."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0) + (h if self.o_proj_bias else 0)
        layer = attn + 3 * h * i + (2 * i + h if self.mlp_bias else 0) + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * layer + h + head

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(model_dir, "no config.json (expected an HF-format model directory)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(path, f"config.json is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(path, f"config.json must be a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str | Path = "config.json") -> "ModelConfig":
        arch = _architecture(raw, path)

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise CheckpointError(path, f"missing required field '{key}'")
            return raw[key]

        def positive_int(key: str, value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(path, f"field '{key}' must be a positive integer, got {value!r}")
            return value

        hidden = positive_int("hidden_size", need("hidden_size"))
        heads = positive_int("num_attention_heads", need("num_attention_heads"))
        kv_heads = positive_int("num_key_value_heads", raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise CheckpointError(
                path, f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise CheckpointError(path, f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
            head_dim = hidden // heads
        head_dim = positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise CheckpointError(path, f"head_dim must be even for RoPE, got {head_dim}")
        if arch == "MistralForCausalLM" and raw.get("sliding_window") not in (None, 0):
            max_pos = raw.get("max_position_embeddings", 0)
            if raw["sliding_window"] < max_pos:
                raise CheckpointError(path, "sliding-window attention is not supported ('sliding_window' is set)")
        rope_theta, scaling = _rope(raw, path)
        return cls(
            architecture=arch,
            vocab_size=positive_int("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=positive_int("intermediate_size", need("intermediate_size")),
            num_hidden_layers=positive_int("num_hidden_layers", need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(raw, arch),
            mlp_bias=bool(raw.get("mlp_bias", False)) and arch == "LlamaForCausalLM",
            max_position_embeddings=positive_int(
                "max_position_embeddings", raw.get("max_position_embeddings", 2048)
            ),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_id_tuple(raw.get("eos_token_id")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The HF `config.json` fields this config stands for (what `save_pretrained` would write)."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[
                self.architecture
            ],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": "float32",
        }
        s = self.rope_scaling
        if s.rope_type == "linear":
            out["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
        elif s.rope_type == "llama3":
            out["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        return out


def _attention_bias(raw: dict[str, Any], arch: str) -> bool:
    # HF's Qwen2 always has q/k/v biases, Mistral never has any; Llama follows `attention_bias`.
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "MistralForCausalLM":
        return False
    return bool(raw.get("attention_bias", False))


def _architecture(raw: dict[str, Any], path: str | Path) -> str:
    archs = raw.get("architectures")
    if isinstance(archs, str):
        archs = [archs]
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(path, f"field 'architectures' must be a list of class names, got {archs!r}")
    if not archs:
        mt = raw.get("model_type")
        by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        if mt in by_type:
            return by_type[mt]
        raise CheckpointError(path, "missing required field 'architectures'")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            path, f"unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _rope(raw: dict[str, Any], path: str | Path) -> tuple[float, RopeScaling]:
    # transformers 4.x writes `rope_theta` + `rope_scaling`; 5.x writes one `rope_parameters` dict.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type not in ("linear", "llama3"):
        raise CheckpointError(path, f"unsupported rope scaling type '{rope_type}' (supported: linear, llama3)")
    if "factor" not in merged:
        raise CheckpointError(path, f"rope scaling '{rope_type}' is missing required field 'factor'")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(merged["factor"]))
    try:
        return theta, RopeScaling(
            "llama3",
            float(merged["factor"]),
            float(merged["low_freq_factor"]),
            float(merged["high_freq_factor"]),
            int(merged["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise CheckpointError(path, f"rope scaling 'llama3' is missing required field {e}") from None


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
