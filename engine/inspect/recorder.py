"""Recording a decoding run: Steps (or a Session's attention log) in, an `AttentionDump` out.

The recorder updates the head statistics (engine/capture/head_stats.py) as each row arrives, from the float32 rows
before they are rounded to float16 for storage, so statistics never need every row in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.capture.head_stats import HeadStats, separator_token_mask
from engine.core.outputs import AttentionRows
from engine.inspect.dump import VALUE_DTYPE, AttentionDump, TopKRows, save_dump

if TYPE_CHECKING:  # only for annotations
    from engine.api.llm import LLM
    from engine.api.session import Session, Step
    from engine.capture.request import AttentionCapture
    from engine.text.tokenizer import Tokenizer


@dataclass
class Recorder:
    """Collects the rows of consecutive steps of one sequence; `dump()` packs them into the file layout."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    token_ids: list[int]  # grows as steps arrive
    tokenizer: Tokenizer | None = field(default=None, repr=False)  # for token_texts; None gives ""
    prompt_len: int | None = None  # default: the ids known at construction
    top_k: int | None = None  # keep only the k largest probabilities of each row (plus the leftover)
    window: int = 4  # local-window size of the statistics
    stats_options: dict = field(default_factory=dict)  # more HeadStats options (max_offset, long_range, ...)
    separator_mask: object | None = field(default=None, repr=False)  # default: built from the tokenizer
    info: dict = field(default_factory=dict)
    stats: HeadStats | None = None  # created with the first rows (their layers and heads)
    _queries: list[int] = field(default_factory=list, repr=False)
    _keys: list[np.ndarray] = field(default_factory=list, repr=False)
    _rows: list = field(default_factory=list, repr=False)  # per step: float16 [L, H, ctx] or top-k triple

    def __post_init__(self) -> None:
        self.token_ids = [int(t) for t in self.token_ids]
        if self.prompt_len is None:
            self.prompt_len = len(self.token_ids)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    @classmethod
    def for_llm(cls, llm: LLM, token_ids: list[int], **kwargs) -> "Recorder":
        c = llm.config
        kwargs.setdefault("separator_mask", llm.engine.separator_mask)
        return cls(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, list(token_ids),
                   llm.tokenizer, **kwargs)

    def add(self, step: Step) -> None:
        """Append one step's token (steps must come in order) and record its attention rows, if any."""
        if step.position == len(self.token_ids):
            self.token_ids.append(int(step.token_id))
        elif step.position > len(self.token_ids) or self.token_ids[step.position] != step.token_id:
            raise ValueError(f"step at position {step.position} does not continue the recorded sequence")
        if step.attention is not None:
            self.add_rows(step.attention)

    def add_rows(self, rows: AttentionRows) -> None:
        """Record one query row per captured layer (every call must capture the same layers and heads)."""
        if not rows.layers:
            raise ValueError("the recorder needs full rows: capture with AttentionCapture(rows=True)")
        layers = tuple(sorted(rows.layers))
        if self.stats is None:
            separators = self.separator_mask
            if separators is None and self.tokenizer is not None:
                separators = separator_token_mask(self.tokenizer, self.tokenizer.vocab_size)
            self.stats = HeadStats(layers, rows.heads, window=self.window, separator_mask=separators,
                                   **self.stats_options)
        elif (layers, tuple(rows.heads)) != (self.stats.layers, self.stats.heads):
            raise ValueError("every recorded step must capture the same layers and heads")
        keys = rows.key_positions
        full = np.stack([rows.layers[layer] for layer in layers])  # [L, H, keys] float32
        self.stats.update([rows.query_position], torch.from_numpy(full)[:, :, None, :], self.token_ids)
        if self.top_k is None:
            self._rows.append(full.astype(VALUE_DTYPE))
        else:
            self._rows.append(_top_k(rows, layers, self.top_k))
        self._queries.append(int(rows.query_position))
        self._keys.append(np.asarray(keys, np.int32))

    def dump(self) -> AttentionDump:
        if self.stats is None:
            raise ValueError("no attention rows were recorded: capture was off, or no token was a query yet "
                             "(a run needs at least two tokens)")
        lengths = [len(k) for k in self._keys]
        values = topk = None
        if self.top_k is None:
            values = np.concatenate(self._rows, axis=-1)
        else:
            pos, val, left = (np.stack(parts, axis=2) for parts in zip(*self._rows))
            topk = TopKRows(pos, val, left)
        texts = [self.tokenizer.decode([t]) if self.tokenizer is not None else "" for t in self.token_ids]
        return AttentionDump(
            token_ids=np.asarray(self.token_ids, np.int32),
            token_texts=texts,
            prompt_len=int(self.prompt_len),
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            kv_group=np.arange(self.n_heads, dtype=np.int32) // (self.n_heads // self.n_kv_heads),
            layers=self.stats.layers,
            heads=self.stats.heads,
            query_positions=np.asarray(self._queries, np.int32),
            row_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            key_positions=np.concatenate(self._keys).astype(np.int32),
            values=values,
            topk=topk,
            stats=self.stats,
            info=dict(self.info),
        )


def _top_k(rows: AttentionRows, layers: tuple[int, ...], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`AttentionRows.top_k` (what the server streams) padded to k: positions -1 and values 0 past the row."""
    top = rows.top_k(k)
    n_heads = len(rows.heads)
    pos = np.full((len(layers), n_heads, k), -1, np.int32)
    val = np.zeros((len(layers), n_heads, k), VALUE_DTYPE)
    left = np.zeros((len(layers), n_heads), np.float32)
    for i, layer in enumerate(layers):
        t = top[layer]
        k_eff = t.positions.shape[1]
        pos[i, :, :k_eff] = rows.key_positions[t.positions]
        val[i, :, :k_eff] = t.probs
        left[i] = t.leftover
    return pos, val, left


def record_prompt(
    llm: LLM,
    prompt_ids: list[int],
    capture: AttentionCapture,
    max_tokens: int = 0,
    **recorder_kwargs,
) -> AttentionDump:
    """Force the prompt token by token (so every prompt token gets a query row), then decode greedily.

    The session starts from the first token and `feed`s the rest: one forward pass, one Step (and one row)
    per token. Up to `max_tokens` tokens are then sampled, stopping at an end-of-sequence token.
    """
    prompt_ids = [int(t) for t in prompt_ids]
    rec = Recorder.for_llm(llm, prompt_ids[:1], prompt_len=len(prompt_ids), **recorder_kwargs)
    stop = set(llm.tokenizer.eos_token_ids)
    with llm.session(prompt_ids[:1], capture=capture) as session:
        for step in session.feed(prompt_ids[1:]):
            rec.add(step)
        for _ in range(max_tokens):
            if len(rec.token_ids) >= llm.max_model_len:
                break
            step = session.step()
            rec.add(step)
            if step.token_id in stop:
                break
    return rec.dump()


def session_recorder(session: Session, **recorder_kwargs) -> Recorder:
    """A recorder replaying a Session's attention log (the rows of every step it took while capturing).

    After `rewind` the log still holds rows of dropped positions and, once re-stepped, two rows for one
    query: keep the latest row of each query that is still in the sequence.
    """
    log = getattr(session, "attention_log", None)
    if log is None:
        raise RuntimeError("this Session keeps no attention_log; record its steps with a Recorder instead")
    latest = {rows.query_position: rows for rows in log}
    cfg = session.runner.config
    rec = Recorder(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, session.token_ids,
                   session.tokenizer, **{"prompt_len": session.seq.num_prompt_tokens, **recorder_kwargs})
    for q in sorted(latest):
        if q < len(rec.token_ids) - 1:  # the last token is never a query yet
            rec.add_rows(latest[q])
    return rec


def dump_session(session: Session, path: str | Path, **recorder_kwargs) -> Path:
    """Save every captured step of a session (the rows in its `attention_log`) as one dump file."""
    return save_dump(session_recorder(session, **recorder_kwargs).dump(), path)
