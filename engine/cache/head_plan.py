"""Head-aware eviction (DuoAttention, Xiao et al. 2024): full caches only for the KV heads that read far back.

Most heads of a model attend to a sink and a local window (StreamingLLM); a few (induction, copying,
long-range heads) reach anywhere into the context. A `HeadPlan` says, per layer, which KV heads keep every
token's K/V; the others keep only a sink and a window (a `KVPolicy`). The plan comes from the head labels
(engine/capture/head_stats.py) of a calibration run (engine/kv_memory/calibrate.py): a KV head keeps its full cache when any of its query heads has a
label in `keep_labels` (primary or secondary).

The two kinds of heads live in two pools (engine/cache/pools.py `KVCache` with per-layer head counts), each
with its own blocks: the full pool grows with the sequence, the window pool holds at most the policy's
`max_blocks` per decoding sequence. Attention runs each layer's full heads over every key and its window
heads over the kept ones (engine/model/attention.py `HeadSplit`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.core.config import ModelConfig

if TYPE_CHECKING:
    from engine.capture.head_labels import HeadLabel

# Labels whose heads need keys outside a sink and a window: they point at an earlier occurrence (induction,
# copying, duplicate), reach far (long-range) or attend to separators anywhere (syntax). Diffuse and mixed heads
# are left to the window: on SmolLM2 keeping them too cost 28 % more full heads for 0.1 % perplexity
# (docs/KV_MEMORY.md).
DEFAULT_KEEP_LABELS = ("induction", "copying", "duplicate", "long-range", "syntax")
FORMAT = "kvmini-head-plan/1"


@dataclass(frozen=True)
class HeadPlan:
    """Per layer, the KV heads that keep a full cache (sorted); every other KV head keeps sink + window."""

    full_kv_heads: tuple[tuple[int, ...], ...]
    num_kv_heads: int
    keep_labels: tuple[str, ...] = DEFAULT_KEEP_LABELS  # how it was made (for the record)

    def __post_init__(self) -> None:
        for layer, heads in enumerate(self.full_kv_heads):
            if list(heads) != sorted(set(heads)) or any(not 0 <= h < self.num_kv_heads for h in heads):
                raise ValueError(f"head plan layer {layer}: full KV heads must be distinct, sorted and in "
                                 f"[0, {self.num_kv_heads}), got {list(heads)}")

    @property
    def num_layers(self) -> int:
        return len(self.full_kv_heads)

    def window_kv_heads(self, layer: int) -> tuple[int, ...]:
        return tuple(h for h in range(self.num_kv_heads) if h not in self.full_kv_heads[layer])

    @property
    def num_full(self) -> int:
        """Full KV heads over every layer (of num_layers x num_kv_heads)."""
        return sum(len(h) for h in self.full_kv_heads)

    @property
    def full_fraction(self) -> float:
        return self.num_full / (self.num_layers * self.num_kv_heads)

    def check(self, config: ModelConfig) -> None:
        """The plan was made for this model's shape (a ValueError naming the mismatch otherwise)."""
        if (self.num_layers, self.num_kv_heads) != (config.num_hidden_layers, config.num_key_value_heads):
            raise ValueError(f"head plan is for {self.num_layers} layers x {self.num_kv_heads} KV heads, the model "
                             f"has {config.num_hidden_layers} x {config.num_key_value_heads}")

    @classmethod
    def from_labels(cls, labels: Sequence[HeadLabel], config: ModelConfig,
                    keep_labels: Sequence[str] = DEFAULT_KEEP_LABELS) -> HeadPlan:
        """Keep a KV head's full cache when any of its query heads has a primary or secondary label in
        `keep_labels`; `labels` cover every (layer, query head) of the model."""
        group = config.num_attention_heads // config.num_key_value_heads
        full = [set() for _ in range(config.num_hidden_layers)]
        seen = set()
        for lab in labels:
            seen.add((lab.layer, lab.head))
            if lab.label in keep_labels or lab.secondary in keep_labels:
                full[lab.layer].add(lab.head // group)
        missing = config.num_hidden_layers * config.num_attention_heads - len(seen)
        if missing:
            raise ValueError(f"head labels cover {len(seen)} heads; a plan needs all "
                             f"{config.num_hidden_layers} x {config.num_attention_heads}")
        return cls(tuple(tuple(sorted(h)) for h in full), config.num_key_value_heads, tuple(keep_labels))

    # ---- JSON --------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "num_kv_heads": self.num_kv_heads, "keep_labels": list(self.keep_labels),
                "full_kv_heads": [list(h) for h in self.full_kv_heads], "full_fraction": round(self.full_fraction, 4)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadPlan:
        """A plan written by `save` (`kvmini head-plan`); a ValueError naming the field otherwise."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"head plan {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"head plan {path}: 'format' must be {FORMAT!r}")
        heads, n = data.get("full_kv_heads"), data.get("num_kv_heads")
        if not isinstance(n, int) or not isinstance(heads, list) or \
                not all(isinstance(h, list) and all(isinstance(i, int) for i in h) for h in heads):
            raise ValueError(f"head plan {path}: 'num_kv_heads' must be an integer and 'full_kv_heads' a list of "
                             "integer lists (one per layer)")
        return cls(tuple(tuple(h) for h in heads), n, tuple(data.get("keep_labels", DEFAULT_KEEP_LABELS)))

    @classmethod
    def coerce(cls, value: HeadPlan | str | Path | None) -> HeadPlan | None:
        return cls.load(value) if isinstance(value, (str, Path)) else value


@dataclass
class HeadSplit:
    """Index tensors of one layer's heads by pool: query heads and KV heads of the full and of the window pool
    (a KV head's query heads are its group, so each part is still grouped-query attention)."""

    full_q: torch.Tensor
    full_kv: torch.Tensor
    window_q: torch.Tensor
    window_kv: torch.Tensor

    @classmethod
    def for_layer(cls, plan: HeadPlan, layer: int, group: int, device) -> HeadSplit:
        def indices(kv_heads):
            q = [kv * group + g for kv in kv_heads for g in range(group)]
            return torch.tensor(q, dtype=torch.long, device=device), torch.tensor(kv_heads, dtype=torch.long,
                                                                                  device=device)
        return cls(*indices(plan.full_kv_heads[layer]), *indices(plan.window_kv_heads(layer)))
