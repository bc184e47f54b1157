"""The head statistics and labels live in engine/capture/head_stats.py (the engine keeps one per capturing request);
this module re-exports them for code that imported them from here."""

from engine.capture.head_stats import (
                                       LABEL_SCORE,
                                       LABELS,
                                       PATTERNS,
                                       SCORE_TITLES,
                                       SCORES,
                                       TL_PATTERNS,
                                       HeadLabel,
                                       HeadStats,
                                       Thresholds,
                                       head_labels,
                                       is_separator_text,
                                       label_heads,
                                       separator_mask_from_texts,
                                       separator_token_mask,
                                       top_heads,
)

__all__ = [
    "LABELS", "LABEL_SCORE", "PATTERNS", "SCORES", "SCORE_TITLES", "TL_PATTERNS", "HeadLabel", "HeadStats",
    "Thresholds", "head_labels", "is_separator_text", "label_heads", "separator_mask_from_texts",
    "separator_token_mask", "top_heads",
]
