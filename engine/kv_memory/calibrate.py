"""Head-plan calibration: label every head on a text and keep a full KV cache for the heads whose labels read far
back (engine/cache/head_plan.py holds the plan and what it does to the pools)."""

from __future__ import annotations

from collections.abc import Sequence

from engine.api.llm import LLM
from engine.cache.head_plan import DEFAULT_KEEP_LABELS, HeadPlan
from engine.capture.head_labels import label_heads
from engine.capture.request import AttentionCapture


def calibrate(llm: LLM, token_ids: Sequence[int], keep_labels: Sequence[str] = DEFAULT_KEEP_LABELS) -> HeadPlan:
    """Label every head on `token_ids` (each token fed as a query row, as `kvmini attn` records a prompt) and
    plan from the labels."""
    if len(token_ids) < 2:
        raise ValueError("calibration needs at least 2 tokens")
    with llm.session(list(token_ids[:1]), capture=AttentionCapture(head_stats=True, top_k=1)) as s:
        s.feed(list(token_ids[1:]))
        stats = s.head_stats
    return HeadPlan.from_labels(label_heads(stats), llm.config, keep_labels)
