"""The attention dump: every recorded query row of a decoding run in one safetensors file.

One file holds the tensors below plus a JSON header in the safetensors metadata under the key
"kvmini.attention" (one file, readable by any safetensors reader). The full spec is in docs/ATTENTION.md.

    token_ids        int32   [T]            the whole sequence (prompt, forced and sampled tokens)
    kv_group         int32   [n_heads]      KV head read by each query head (h // (n_heads // n_kv_heads))
    layers, heads    int32   [L], [H]       the captured layers / query heads, in axis order
    query_positions  int32   [S]            the query of each recorded step
    row_offsets      int64   [S + 1]        step s owns keys row_offsets[s] : row_offsets[s + 1]
    key_positions    int32   [R]            absolute key position of every stored column (ragged rows)
    values           float16 [L, H, R]      mode "full": the probabilities, rows stored back to back
    topk_positions   int32   [L, H, S, k]   mode "topk": the k largest per row (-1 pads rows shorter than k)
    topk_values      float16 [L, H, S, k]
    topk_leftover    float32 [L, H, S]      1 - sum(topk_values), so each row sums to 1 exactly in float32
    stats.<name>                            the accumulators of `engine.capture.head_stats.HeadStats.state()` (from the
                                            float32 rows); version 1 files held stats_mass/total/spread instead,
                                            and their statistics are recomputed from the rows on loading
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.capture.head_stats import SCORES, HeadStats, separator_mask_from_texts
from engine.core.outputs import AttentionRows

FORMAT = "kvmini.attention"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: the same rows, older statistics (recomputed on loading)
STATS_PREFIX = "stats."
HEADER_KEY = "kvmini.attention"
VALUE_DTYPE = np.float16


@dataclass
class TopKRows:
    """The k largest probabilities of every row (mode "topk")."""

    positions: np.ndarray  # int32 [L, H, S, k] absolute key positions, -1 = padding
    values: np.ndarray  # float16 [L, H, S, k], 0 where padded
    leftover: np.ndarray  # float32 [L, H, S]


@dataclass
class AttentionDump:
    """A decoding run's attention, as stored: see the module docstring for every array."""

    token_ids: np.ndarray
    token_texts: list[str]
    prompt_len: int  # tokens given by the caller (prompt and forced tokens), not sampled
    n_layers: int
    n_heads: int
    n_kv_heads: int
    kv_group: np.ndarray
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    query_positions: np.ndarray
    row_offsets: np.ndarray
    key_positions: np.ndarray
    values: np.ndarray | None = None  # mode "full"
    topk: TopKRows | None = None  # mode "topk"
    stats: HeadStats | None = None
    info: dict = field(default_factory=dict)  # free-form provenance: model, prompt or probe settings

    @property
    def mode(self) -> str:
        return "full" if self.values is not None else "topk"

    @property
    def num_steps(self) -> int:
        return len(self.query_positions)

    def keys(self, step: int) -> np.ndarray:
        return self.key_positions[self.row_offsets[step] : self.row_offsets[step + 1]]

    def rows(self, step: int) -> AttentionRows:
        """One step as the engine hands it out (float32; in mode "topk" unstored entries are 0).

        Like `AttentionRows`, the rows are dense over key positions 0..query_position.
        """
        q = int(self.query_positions[step])
        dense = np.zeros((len(self.layers), len(self.heads), q + 1), np.float32)
        if self.values is not None:
            a, b = self.row_offsets[step], self.row_offsets[step + 1]
            dense[:, :, self.key_positions[a:b]] = self.values[:, :, a:b]
        else:
            pos, val = self.topk.positions[:, :, step], self.topk.values[:, :, step].astype(np.float32)
            li, hi, ki = np.nonzero(pos >= 0)
            dense[li, hi, pos[li, hi, ki]] = val[li, hi, ki]
        return AttentionRows(q, self.heads, {layer: dense[i] for i, layer in enumerate(self.layers)})

    def matrix(self, layer: int, head: int) -> np.ndarray:
        """`[S, max query + 1]` float32: the head's rows stacked (lower-triangular when steps are consecutive)."""
        li, hi = self.layers.index(layer), self.heads.index(head)
        width = int(self.query_positions.max()) + 1 if self.num_steps else 0
        out = np.zeros((self.num_steps, width), np.float32)
        for s in range(self.num_steps):
            if self.values is not None:
                a, b = self.row_offsets[s], self.row_offsets[s + 1]
                out[s, self.key_positions[a:b]] = self.values[li, hi, a:b]
            else:
                pos = self.topk.positions[li, hi, s]
                out[s, pos[pos >= 0]] = self.topk.values[li, hi, s][pos >= 0]
        return out

    def recompute_stats(self, window: int = 4, **options) -> HeadStats:
        """Statistics from the stored (float16 or top-k) rows, for dumps written without them (or by version 1).

        Separators are recognised from `token_texts` (no tokenizer needed)."""
        stats = HeadStats(self.layers, self.heads, window=window, **options,
                          separator_mask=separator_mask_from_texts(self.token_ids, self.token_texts))
        ids = [int(t) for t in self.token_ids]
        for s in range(self.num_steps):
            r = self.rows(s)
            rows = np.stack([r.layers[layer] for layer in self.layers])[:, :, None, :]
            stats.update([r.query_position], torch.from_numpy(rows), ids)
        return stats


def save_dump(dump: AttentionDump, path: str | Path) -> Path:
    """Write `dump` to `path` (a .safetensors file); the same dump always gives the same bytes."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {
        "token_ids": np.asarray(dump.token_ids, np.int32),
        "kv_group": np.asarray(dump.kv_group, np.int32),
        "layers": np.asarray(dump.layers, np.int32),
        "heads": np.asarray(dump.heads, np.int32),
        "query_positions": np.asarray(dump.query_positions, np.int32),
        "row_offsets": np.asarray(dump.row_offsets, np.int64),
        "key_positions": np.asarray(dump.key_positions, np.int32),
    }
    if dump.values is not None:
        tensors["values"] = np.asarray(dump.values, VALUE_DTYPE)
    else:
        tensors["topk_positions"] = np.asarray(dump.topk.positions, np.int32)
        tensors["topk_values"] = np.asarray(dump.topk.values, VALUE_DTYPE)
        tensors["topk_leftover"] = np.asarray(dump.topk.leftover, np.float32)
    stats_header = None
    if dump.stats is not None:
        st = dump.stats
        state = st.state()
        tensors |= {STATS_PREFIX + name: value for name, value in state.items()}
        stats_header = {
            "window": st.window, "max_offset": st.max_offset, "long_range": st.long_range,
            "global_mean": st.global_mean, "global_rows": st.global_rows, "global_lift": st.global_lift,
            "n_rows": st.n_rows,
            "tensors": sorted(state), "scores": list(SCORES),
        }
    header = {
        "format": FORMAT,
        "version": VERSION,
        "mode": dump.mode,
        "top_k": None if dump.topk is None else int(dump.topk.positions.shape[-1]),
        "value_dtype": "float16",
        "n_layers": dump.n_layers,
        "n_heads": dump.n_heads,
        "n_kv_heads": dump.n_kv_heads,
        "prompt_len": dump.prompt_len,
        "token_texts": list(dump.token_texts),
        "stats": stats_header,
        "info": dump.info,
    }
    # safetensors needs contiguous arrays; sort_keys keeps the header byte-identical across round trips.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    return path


def load_dump(path: str | Path) -> AttentionDump:
    """Read a dump written by `save_dump` (or any writer that follows docs/ATTENTION.md)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no attention dump at {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            t = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a malformed file
        raise ValueError(f"{path} is not a safetensors file: {e}") from None
    if HEADER_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not an attention dump (no '{HEADER_KEY}' metadata)")
    h = json.loads(meta[HEADER_KEY])
    if h.get("format") != FORMAT or h.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported dump format {h.get('format')!r} version {h.get('version')!r}")
    layers, heads = tuple(int(x) for x in t["layers"]), tuple(int(x) for x in t["heads"])
    stats = None
    if h.get("stats") is not None and h["version"] >= 2:
        state = {name[len(STATS_PREFIX) :]: v for name, v in t.items() if name.startswith(STATS_PREFIX)}
        try:
            stats = HeadStats.from_state(state)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: malformed head statistics: {e}") from None
    topk = None
    if h["mode"] == "topk":
        topk = TopKRows(t["topk_positions"], t["topk_values"], t["topk_leftover"])
    dump = AttentionDump(
        token_ids=t["token_ids"], token_texts=list(h["token_texts"]), prompt_len=int(h["prompt_len"]),
        n_layers=int(h["n_layers"]), n_heads=int(h["n_heads"]), n_kv_heads=int(h["n_kv_heads"]),
        kv_group=t["kv_group"], layers=layers, heads=heads, query_positions=t["query_positions"],
        row_offsets=t["row_offsets"], key_positions=t["key_positions"], values=t.get("values"), topk=topk,
        stats=stats, info=h.get("info") or {},
    )
    _check(dump, path)
    if h["version"] == 1:  # the old accumulators are not the new statistics: recompute them from the rows
        window = (h.get("stats") or {}).get("window", 4)
        dump.stats = dump.recompute_stats(window)
    return dump


def _check(d: AttentionDump, path: Path) -> None:
    """Shape checks, so a damaged file fails here rather than deep inside the report."""
    s, r = len(d.query_positions), len(d.key_positions)
    problems = []
    if len(d.row_offsets) != s + 1 or (s and (d.row_offsets[0] != 0 or d.row_offsets[-1] != r)):
        problems.append("row_offsets do not cover key_positions")
    if np.any(np.diff(d.row_offsets) < 0):
        problems.append("row_offsets decrease")
    if len(d.token_texts) != len(d.token_ids):
        problems.append("token_texts and token_ids differ in length")
    if s and int(d.query_positions.max()) >= len(d.token_ids):
        problems.append("a query position is past the last token")
    if d.values is not None and d.values.shape != (len(d.layers), len(d.heads), r):
        problems.append(f"values has shape {d.values.shape}, expected {(len(d.layers), len(d.heads), r)}")
    if d.topk is not None and d.topk.positions.shape[:3] != (len(d.layers), len(d.heads), s):
        problems.append("topk arrays do not match layers x heads x steps")
    if problems:
        raise ValueError(f"{path}: malformed attention dump: {'; '.join(problems)}")
