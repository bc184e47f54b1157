"""Batch invariance: every row of a step is computed in a way that depends on its own request only.

A CPU matrix product's rounding depends on more than its operands: oneDNN and MKL pick kernels, blockings
and thread splits by the row count M, so row r of `x @ W.T` can differ in its last bit between M = 1 and
M = 7, and the quantized layers switch to dequantize-and-matmul above 32 rows. Greedy decoding of a small
model turns one such bit into a different text. So with `batch_invariant=True` (the default) a step lays
its rows out in two kinds whose arithmetic never depends on the rest of the step:

- **prompt tiles**: prompt tokens (and tokens a Session feeds several at a time) are computed on a fixed
  grid of tiles of absolute positions (`prompt_tile`): every matrix product of a tile has the tile's own
  shape, its rows sit at their fixed offsets (zero padding around them), and its attention reads keys up
  to the tile's end. A chunk boundary, a prefix-cache hit or a batch neighbour cannot move a row.
- **decode rows**: tokens the engine generated (one per sequence per step, or many when a preempted
  sequence is recomputed) go through kernels whose per-row result was checked, when the model was built,
  not to depend on the row count (`RowCheck`), and attend one row per call over exactly their keys.

What is not covered: a different CPU, PyTorch build or thread count (kernels change); tensor parallelism
(the all-reduce splits its buffer by size); a sink + window policy after preemption (the window's keys
are recomputed without the evicted ones). docs/PERFORMANCE.md has what it costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Prompt tiles: 16 rows up to position 32, 32 up to 64, then 64. Small tiles first, so that a short prompt
# pads little; 64 rows, so that a long one streams the weights once per 64 tokens (a 64-row product costs
# about what a 1-row one does in weight traffic). Changing these changes every prompt's rounding.
PROMPT_TILE_STEPS = ((32, 16), (64, 32))
PROMPT_TILE = 64
# Row counts the load-time check covers: every count up to 16, then those around each multiple of 8 up to
# 64 (where kernels change their blocking), then the multiples of 64 up to a layer's `row_check_limit` (a
# dense layer's: a 512-row prompt chunk then stays one call, not eight). Larger groups run in chunks.
CHECKED_ROWS = 64
CHECKED_COUNTS = sorted(set(range(2, 17)) | {m + d for m in range(24, CHECKED_ROWS + 1, 8) for d in (-1, 0, 1)}
                        - {CHECKED_ROWS + 1})
DENSE_CHECKED_ROWS = 512


def prompt_tile(position: int) -> tuple[int, int]:
    """(start, size) of the prompt tile holding absolute `position`."""
    start = 0
    for end, size in PROMPT_TILE_STEPS:
        if position < end:
            return position - (position - start) % size, size
        start = end
    return position - (position - start) % PROMPT_TILE, PROMPT_TILE


def tile_boundary_below(start: int, end: int) -> int:
    """The last tile boundary in (start, end], or `end` when the run from `start` stays inside one tile:
    where a budget-limited prompt chunk should stop, so that no tile is split over two steps."""
    tile_start, _ = prompt_tile(end)
    return tile_start if tile_start > start else end


@dataclass
class RowTile:
    """Rows `[start, start + num_rows)` of the flat batch: decode rows (`size` 0), or the real rows of one
    prompt tile of `size` rows, where they sit at `offset`."""

    start: int
    num_rows: int
    size: int = 0
    offset: int = 0


@dataclass
class RowPlan:
    """How a step's linear layers split the flat batch, in order (the tiles cover every row once)."""

    tiles: list[RowTile] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        return len(self.tiles) == 1 and self.tiles[0].size == 0


def run_tile(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, tile: RowTile) -> torch.Tensor:
    """`fn` on a zero tile of `tile.size` rows with `rows` at `tile.offset`; their outputs."""
    if rows.shape[0] == tile.size:
        return fn(rows)
    padded = rows.new_zeros(tile.size, rows.shape[1])
    padded[tile.offset : tile.offset + rows.shape[0]] = rows
    return fn(padded)[tile.offset : tile.offset + rows.shape[0]]


def run_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, invariant_rows: int) -> torch.Tensor:
    """`fn` on x's rows, at most `invariant_rows` at a time (1: one row per call, invariant by shape)."""
    if x.shape[0] <= invariant_rows:
        return fn(x)
    return torch.cat([fn(x[i : i + invariant_rows]) for i in range(0, x.shape[0], invariant_rows)])


class RowCheck:
    """Finds, once per kernel and shape, how many rows one call may take while each row's result stays the
    one it has alone: `CHECKED_ROWS` when every count from 1 to it gives a row bitwise its result at M = 1,
    else 1 (one row per call, slower but invariant by shape). Random inputs: a kernel or blocking change
    shows in the last bits of nearly every output."""

    def __init__(self) -> None:
        self._results: dict[tuple, int] = {}

    def invariant_rows(self, key: tuple, fn: Callable[[torch.Tensor], torch.Tensor], in_features: int,
                       dtype: torch.dtype, device: torch.device, limit: int = CHECKED_ROWS) -> int:
        if key not in self._results:
            self._results[key] = _check(fn, in_features, dtype, device, limit)
        return self._results[key]

    def moving_kernels(self) -> list[str]:
        """The checked kernels and shapes whose rows move with the row count (key: kind, out, in, ...)."""
        return [f"{key[0]} {key[2]}->{key[1]}" for key, rows in self._results.items() if rows == 1]


def describe(linears: list) -> str:
    """How batch invariance runs these layers, for start-up banners: "64 decode rows per call", or which
    ones go one row per call."""
    single = [lin for lin in linears if lin.invariant_rows == 1]
    if not single:
        return f"{min(lin.invariant_rows for lin in linears)} decode rows per call"
    return f"{len(single)} of {len(linears)} layers one decode row per call (their kernels' rounding moves with M)"


@torch.inference_mode()
def _check(fn, in_features: int, dtype: torch.dtype, device: torch.device, limit: int) -> int:
    """The largest checked row count up to which every checked count keeps row 0's and the last row's results
    (1: none above 1 does)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(limit, in_features, generator=g).to(dtype=dtype, device=device)
    first, passed = fn(x[:1]), 1
    for m in CHECKED_COUNTS + list(range(2 * CHECKED_ROWS, limit + 1, CHECKED_ROWS)):
        y = fn(x[:m])
        if not (torch.equal(y[:1], first) and torch.equal(y[m - 1 : m], fn(x[m - 1 : m]))):
            break
        passed = m
    return passed if passed >= CHECKED_ROWS else 1


def apply_plan(layer, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """A linear layer (PackedLinear, DenseLinear, Int8Linear, Int4Linear) on the flat batch `x` `[T, in]`
    laid out by `plan`, every call at a row count the layer's check covered: decode rows in calls of at most
    64 (and at most `layer.invariant_rows`); consecutive full 64-row tiles together, up to
    `layer.invariant_rows` rows (the multiples of 64 were checked); any other tile alone, through
    `layer.tile_fn(size)`, which says whether it must be padded to its size (a kernel whose rounding
    depends on the row count) or may run its real rows as decode rows do."""
    decode_rows = min(layer.invariant_rows, CHECKED_ROWS)
    if plan.decode_only:  # the usual step
        return run_rows(layer.row_fn, x, decode_rows)
    parts, fns, full = [], {}, None  # full: where the current run of full 64-row tiles starts
    for tile in plan.tiles:
        if tile.size and tile.size not in fns:
            fns[tile.size] = layer.tile_fn(tile.size)
        fn, pad = fns[tile.size] if tile.size else (layer.row_fn, False)
        if tile.num_rows == tile.size == PROMPT_TILE and not pad:  # a full tile the kernel may merge
            full = tile.start if full is None else full
            continue
        if full is not None:
            parts.append(run_rows(layer.row_fn, x[full : tile.start], layer.invariant_rows))
            full = None
        rows = x[tile.start : tile.start + tile.num_rows]
        parts.append(run_tile(fn, rows, tile) if pad else run_rows(layer.row_fn, rows, decode_rows))
    if full is not None:
        parts.append(run_rows(layer.row_fn, x[full:], layer.invariant_rows))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
