"""The induction probe: BOS, then k random tokens, then the same k tokens again, all forced.

In the second copy every token has occurred once before, so an induction head (A B ... A -> B) attends to
the token after that earlier occurrence, and a previous-token head attends one back as everywhere else. The
random tokens carry no meaning, so the scores measure the mechanism rather than the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.inspect.dump import AttentionDump
from engine.inspect.recorder import record_prompt

if TYPE_CHECKING:
    from engine.api.llm import LLM
    from engine.capture.request import AttentionCapture


@dataclass(frozen=True)
class Probe:
    length: int = 50  # k: random tokens per copy
    seed: int = 0

    def __post_init__(self) -> None:
        if self.length < 2:
            raise ValueError(f"probe length must be >= 2, got {self.length}")

    def token_ids(self, llm: LLM) -> list[int]:
        """BOS (when the model has one) + k distinct random ordinary tokens, twice."""
        tok = llm.tokenizer
        vocab = min(llm.config.vocab_size, tok.vocab_size)
        # Special tokens would mean something (end of text, chat roles): draw only ordinary ones, and draw
        # them without replacement so each token of the second copy has exactly one earlier occurrence.
        special = set(tok.special_token_ids) | set(tok.eos_token_ids)
        if tok.bos_token_id is not None:
            special.add(tok.bos_token_id)
        pool = np.array([i for i in range(vocab) if i not in special])
        if len(pool) < self.length:
            raise ValueError(f"the vocabulary has only {len(pool)} ordinary tokens, fewer than {self.length}")
        rng = np.random.default_rng(self.seed)
        body = [int(t) for t in rng.choice(pool, size=self.length, replace=False)]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + body + body


def run_probe(
    llm: LLM,
    probe: Probe = Probe(),
    capture: AttentionCapture | None = None,
    **recorder_kwargs,
) -> AttentionDump:
    """Force the probe through the model with attention captured; the dump's stats hold the layer x head map.

    The rows are those of queries 0 .. 2k-1 (with BOS; the last forced token is never run as a query).
    """
    from engine.capture.request import AttentionCapture

    ids = probe.token_ids(llm)
    info = {"source": "probe", "probe_length": probe.length, "probe_seed": probe.seed}
    info |= recorder_kwargs.pop("info", {})
    return record_prompt(llm, ids, capture or AttentionCapture(), max_tokens=0, info=info, **recorder_kwargs)
