"""Per-head attention statistics, accumulated online from query rows (the labels they give: head_labels.py).

`HeadStats.update` takes a batch of query rows `[L, H, R, C]` (R queries, probabilities over keys 0..C-1,
zeros after each row's own query) and adds them to running sums with a few vectorised torch operations on
the rows' device (no loop over layers, heads or keys). No row is kept: only per-(layer, head) sums, and
per-key column sums `[L, H, C]` so that global columns can be found at any position when the scores are read.

Notation: a row of query `q` has probabilities `p_j` over keys `j` (its total `T = Σ_j p_j`, 1 for a softmax
row, less for a stored top-k row); `t` are the tokens; `Σ_r` sums over every recorded row. The strongest
key of a row is a key `j*` with `p_j* = max_j p_j`; a flat row (its maximum no higher than its mean, e.g. a
uniform row or a one-key row) has none. `G` is the head's set of global columns (below); `sep(j)` says that
key `j` holds a separator token (`separator_token_mask`); `C_j = Σ_r p_j` is the column sum of key `j`.

TransformerLens-compatible "mul" scores (numerator and denominator each summed over every row):

    sink          Σ_r p_0 / Σ_r T                           the first token
    self          Σ_r p_q / Σ_r T                           the diagonal
    prev          Σ_r p_{q-1} / Σ_r T                       TransformerLens' previous-token pattern
    local         Σ_r Σ_{q-w<j<=q} p_j / Σ_r T              the `window` (w) most recent keys, self included
    duplicate_tl  Σ_r Σ_{j<q, t_j=t_q} p_j / Σ_r T          TransformerLens' duplicate-token pattern
    induction_tl  Σ_r Σ_{1<=j<=q, t_{j-1}=t_q} p_j / Σ_r T  TransformerLens' induction pattern

`prev`, `duplicate_tl` and `induction_tl` are exactly head_detector.py's patterns (exclude_bos=False,
exclude_current_token=False). The scores the labels use:

    induction     induction_tl's sums over the eligible rows E only: rows whose query token occurred before
                  (t_i = t_q for some i < q); on other rows the pattern has nothing to point at
    duplicate     duplicate_tl's sums over the same eligible rows E
    copying       retrieval score (Wu et al. 2024): over the rows whose produced token t_{q+1} is known and
                  occurs among keys 0..q, the fraction whose strongest key holds t_{q+1}
    positional    max over offsets k = 1..max_offset of the fraction of rows (with q >= k) whose strongest key
                  is q - k; `details()` gives that offset and the whole distribution (k = 1: previous token)
    global        Σ_{j in G} C_j / Σ_r T: the attention on the head's global columns
    long_range    Σ_{j not in G} Σ_r p_j [q - j >= long_range] / Σ_r T: far attention off the global columns
    syntax        Σ_{j not in G, sep(j)} C_j / Σ_r T: attention on separators/punctuation off the global columns
    distance      Σ_r Σ_j p_j (q - j) / Σ_r T: the mean look-back, in tokens
    entropy       mean over rows with q >= 1 of -log(Σ_j (p_j/T)^2) / log(q + 1): normalised collision
                  (Rényi-2) entropy, 1 = uniform, 0 = one key. Rényi-2 rather than Shannon because it needs
                  one multiply-add per key where Shannon needs a logarithm (several times slower on a CPU).

Global columns: key j is global for a head when the n_j rows that could see it (q >= j) gave it on average
at least `global_mean` of their attention and at least `global_lift` times what uniform rows would have
given it, C_j / n_j >= max(global_mean, global_lift * u_j) with u_j = mean over those rows of 1 / (q + 1),
and n_j >= global_rows: a column every row attends to, at any position (BOS, a newline, a full stop).
(Without the lift, a uniform head's first key would be "global" on a short run: u_0 = 0.19 at 19 rows.)

When several keys share a row's maximum, the strongest key is any of them: the nearest one for the offset
distribution (exact float ties between distinct keys do not happen in real rows; flat rows are excluded).

Labels (engine/capture/head_labels.py `label_heads`): every rule of `head_labels` that holds, in the priority
order of LABELS; the first is the primary label, the next (if any besides diffuse/mixed) the secondary.
docs/ATTENTION.md explains them.
"""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The TransformerLens-style mass patterns, in the order of the first columns of the per-head accumulator.
TL_PATTERNS = ("sink", "self", "prev", "local", "duplicate_tl", "induction_tl")
SCORES = (
    "induction", "copying", "duplicate", "positional", "self", "long_range", "syntax", "global", "local",
    "entropy", "distance", "sink", "prev", "duplicate_tl", "induction_tl",
)
# Scores that are fractions in [0, 1] of a pattern (every score but the spread measures).
PATTERNS = tuple(s for s in SCORES if s not in ("entropy", "distance"))
SCORE_TITLES = {
    "induction": "induction", "copying": "copying (retrieval)", "duplicate": "duplicate token",
    "positional": "positional (best offset)", "self": "self", "long_range": "long range", "syntax": "separators",
    "global": "global columns", "local": "local window", "entropy": "entropy", "distance": "mean distance",
    "sink": "first token", "prev": "previous token", "duplicate_tl": "duplicate (TransformerLens)",
    "induction_tl": "induction (TransformerLens)",
}
# Every label, in priority order (the primary label is the first whose rule holds).
LABELS = (
    "induction", "copying", "duplicate", "previous-token", "positional", "self", "syntax", "sink", "local",
    "long-range", "diffuse", "mixed",
)
# Tokens whose text is made of these Unicode categories only (after stripping whitespace) are separators.
_PUNCTUATION = ("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po")
_FLAT = 1e-5  # a row is flat when max_j p_j <= (T / keys) * (1 + _FLAT)
_CHUNK = 1 << 24  # the batched path works on at most this many probabilities at a time


class HeadStats:
    """Running sums for the captured (layer, head) grid; `scores()` turns them into numbers.

    `token_ids` given to `update` must extend the sequence of earlier calls (the prefix never changes); rows
    may come in any order and in batches of any size. A batch of R rows adds exactly what R one-row calls add.
    """

    # Columns of the per-head accumulator `acc` [L*H, ...]: the TL masses and row total, then the same over
    # the eligible rows, copying hits, the distance numerator, the entropy sum, then offset hits k = 0..K.
    _ACC = (*TL_PATTERNS, "e_induction", "e_duplicate", "total", "e_total", "q_total", "copy_hits", "entropy")

    def __init__(
        self,
        layers: Sequence[int],
        heads: Sequence[int],
        *,
        window: int = 4,
        max_offset: int = 8,
        long_range: int = 16,
        global_mean: float = 0.2,
        global_rows: int = 8,
        global_lift: float = 2.0,
        separator_mask: torch.Tensor | np.ndarray | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.layers, self.heads = tuple(int(x) for x in layers), tuple(int(x) for x in heads)
        if not self.layers or not self.heads:
            raise ValueError("HeadStats needs at least one layer and one head")
        if min(window, max_offset, long_range) < 1:
            raise ValueError(f"window, max_offset and long_range must be >= 1, got {window}, {max_offset}, "
                             f"{long_range}")
        if not 0 < global_mean <= 1 or global_rows < 1 or global_lift < 0:
            raise ValueError(f"global_mean must be in (0, 1], global_rows >= 1 and global_lift >= 0, got "
                             f"{global_mean}, {global_rows}, {global_lift}")
        self.window, self.max_offset, self.long_range = int(window), int(max_offset), int(long_range)
        self.global_mean, self.global_rows, self.global_lift = float(global_mean), int(global_rows), float(global_lift)
        self.device = torch.device(device)
        self.separator_mask = None if separator_mask is None else np.asarray(
            separator_mask.cpu() if isinstance(separator_mask, torch.Tensor) else separator_mask, dtype=bool)
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        n = len(self.layers) * len(self.heads)
        self._layer_index = {layer: i for i, layer in enumerate(self.layers)}
        self._head_index = {head: i for i, head in enumerate(self.heads)}
        self._span = max(self.max_offset, self.window - 1) + 1  # keys q, q-1, ... gathered for each row
        self.acc = torch.zeros(n, len(self._ACC) + self.max_offset + 1, dtype=self.dtype, device=self.device)
        # Per-key column sums [L*H, C] (float32: one add per key and step), grown on demand.
        self.column_mass = torch.zeros(n, 0, dtype=torch.float32, device=self.device)
        self.column_near = torch.zeros(n, 0, dtype=torch.float32, device=self.device)  # q - j < long_range
        # Host-side bookkeeping (head-independent): row counts and the token sequence.
        self.query_counts = np.zeros(0, np.int64)  # rows recorded per query position
        self.n_induction_rows = 0  # rows whose query token occurred before
        self.n_copy_rows = 0  # rows whose produced token is known and occurs among their keys
        self._tokens: list[int] = []
        self._separator: list[bool] = []
        self._positions: dict[int, list[int]] = {}  # token -> its positions, ascending

    def to(self, device: str | torch.device) -> "HeadStats":
        """Move the sums to `device` (in place; returns self)."""
        self.device = torch.device(device)
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.acc = self.acc.to(self.device, self.dtype)
        self.column_mass = self.column_mass.to(self.device)
        self.column_near = self.column_near.to(self.device)
        return self

    @property
    def n_rows(self) -> int:
        return int(self.query_counts.sum())

    @property
    def token_ids(self) -> list[int]:
        return list(self._tokens)

    # ---- accumulating ---------------------------------------------------------------------------------
    def _extend_tokens(self, token_ids) -> None:
        n = len(token_ids)
        old = len(self._tokens)
        if n <= old:
            return
        new = token_ids[old:n]
        new = new.tolist() if isinstance(new, torch.Tensor | np.ndarray) else [int(t) for t in new]
        mask = self.separator_mask
        for i, tok in enumerate(new, start=old):
            self._positions.setdefault(tok, []).append(i)
            self._separator.append(bool(mask is not None and 0 <= tok < mask.size and mask[tok]))
        self._tokens += new

    def rewind(self, num_tokens: int) -> None:
        """Forget the tokens from position `num_tokens` on (a session rewound; later calls give the new ones).
        The rows already counted stay counted."""
        for tok in self._tokens[num_tokens:]:
            self._positions[tok].pop()
        del self._tokens[num_tokens:], self._separator[num_tokens:]

    def _grow_columns(self, c: int) -> None:
        have = self.column_mass.shape[1]
        if c > have:
            cap = max(c, 2 * have, 64)
            for name in ("column_mass", "column_near"):
                old = getattr(self, name)
                grown = torch.zeros(old.shape[0], cap, dtype=old.dtype, device=old.device)
                grown[:, :have] = old
                setattr(self, name, grown)
        if c > self.query_counts.size:
            self.query_counts = np.concatenate([self.query_counts, np.zeros(max(c, 2 * self.query_counts.size)
                                                                            - self.query_counts.size, np.int64)])

    def _earlier(self, token: int, before: int) -> list[int]:
        """Positions < `before` that hold `token`."""
        pos = self._positions.get(token, [])
        return pos[: bisect.bisect_left(pos, before)]

    def update(self, query_positions, rows: torch.Tensor, token_ids) -> None:
        """Add R query rows per (layer, head).

        `rows`: float `[L, H, R, C]`, row r the probabilities of query `query_positions[r]` over keys 0..C-1
        (zeros after the query; C >= max query + 1). `token_ids`: the sequence (list or tensor), at least up
        to the largest query; where it holds q + 1, that token is what the row of query q produced.
        """
        if rows.dim() != 4 or tuple(rows.shape[:2]) != (len(self.layers), len(self.heads)):
            raise ValueError(f"rows must be [L={len(self.layers)}, H={len(self.heads)}, R, C], "
                             f"got {tuple(rows.shape)}")
        n_rows, c = rows.shape[2], rows.shape[3]
        qs = (query_positions.reshape(-1).tolist() if isinstance(query_positions, torch.Tensor | np.ndarray)
              else [int(x) for x in query_positions])
        if len(qs) != n_rows:
            raise ValueError(f"{len(qs)} query positions for {n_rows} rows")
        if n_rows == 0:
            return
        if min(qs) < 0 or max(qs) >= c:
            raise ValueError(f"query positions must be in 0..{c - 1} (the rows have {c} keys), got {qs}")
        self._extend_tokens(token_ids)
        if len(self._tokens) <= max(qs):
            raise ValueError(f"token_ids has {len(self._tokens)} tokens, fewer than query {max(qs)} + 1")
        if self.n_rows == 0 and rows.device != self.device:
            self.to(rows.device)  # keep the sums where the rows are: no copy per step
        self._grow_columns(c)
        p = rows.reshape(-1, n_rows, c)
        if p.device != self.device or p.dtype != torch.float32:
            p = p.to(self.device, torch.float32)
        if n_rows == 1:
            self._update_one(qs[0], p[:, 0])
        else:
            step = max(1, _CHUNK // max(1, p.shape[0] * c))
            for a in range(0, n_rows, step):
                self._update_many(qs[a : a + step], p[:, a : a + step])
        np.add.at(self.query_counts, qs, 1)

    def _row_facts(self, q: int) -> tuple[list[int], list[int], bool]:
        """Host-side facts of the row of query q: earlier copies of t_q, keys holding t_{q+1}, copy-eligible."""
        dup = self._earlier(self._tokens[q], q)
        has_next = q + 1 < len(self._tokens)
        holds_next = self._earlier(self._tokens[q + 1], q + 1) if has_next else []
        return dup, holds_next, bool(holds_next)

    def _update_one(self, q: int, row: torch.Tensor) -> None:
        """One row `[n, C]`: four passes over the row (sum, max, Σp², the column add); the pattern keys are
        gathered (the window, key 0, earlier copies of t_q and the keys after them, keys holding t_{q+1})
        and summed by one small matrix product."""
        dup, holds_next, copy_elig = self._row_facts(q)
        n_win = min(self._span, q + 1)
        n_off = min(n_win, self.max_offset + 1)
        nd = len(dup)
        idx = list(range(q, q - n_win, -1)) + [0] + dup + [d + 1 for d in dup] + holds_next
        a, b = n_win + 1, n_win + 1 + nd
        sel = np.zeros((len(idx), 8), np.float32)  # columns: the first 8 of _ACC
        sel[n_win, 0] = sel[0, 1] = 1.0  # sink, self
        if n_win > 1:
            sel[1, 2] = 1.0  # prev
        sel[: min(self.window, n_win), 3] = 1.0  # local
        sel[a:b, 4] = sel[b : b + nd, 5] = 1.0  # duplicate, induction
        if nd:  # an eligible row: the same two again
            sel[b : b + nd, 6] = sel[a:b, 7] = 1.0
        d = self.device
        g = row.index_select(1, torch.tensor(idx, device=d))
        total, top, sq = row.sum(-1), row.amax(-1), torch.linalg.vector_norm(row, 2, -1).square()
        self.column_mass[:, : row.shape[1]] += row
        lo = max(0, q - self.long_range + 1)
        self.column_near[:, lo : q + 1] += row[:, lo : q + 1]

        strong = top > total * ((1 + _FLAT) / (q + 1))  # not a flat row
        hits = (g[:, :n_off] == top[:, None]) & strong[:, None]
        first = (hits & (hits.cumsum(-1) == 1)).to(row.dtype)  # the nearest strongest key in the window
        if n_off < self.max_offset + 1:
            first = F.pad(first, (0, self.max_offset + 1 - n_off))
        copy_hit = ((g[:, b + nd :].amax(-1) == top) & strong).to(row.dtype) if copy_elig else total * 0
        entropy = torch.log(total * total / sq) * (1 / float(np.log(q + 1))) if q >= 1 else total * 0
        scaled = total[:, None] * torch.tensor([1.0, float(bool(nd)), float(q)], device=d)
        self.acc += torch.cat([g @ torch.from_numpy(sel).to(d), scaled, copy_hit[:, None], entropy[:, None], first],
                              dim=1)
        self.n_induction_rows += bool(nd)
        self.n_copy_rows += copy_elig

    def _update_many(self, qs: list[int], p: torch.Tensor) -> None:
        """R rows `[n, R, C]` at once, with dense [R, C] masks: the same sums as R calls of `_update_one`."""
        d, (n, n_rows, c) = self.device, p.shape
        facts = [self._row_facts(q) for q in qs]
        q = torch.tensor(qs, device=d)
        j = torch.arange(c, device=d)
        tok = torch.tensor((self._tokens + [-1] * c)[:c], device=d)
        prev_tok = torch.cat([torch.full((1,), -1, device=d, dtype=tok.dtype), tok[:-1]])
        q_tok = tok[q][:, None]
        qc = q[:, None]
        seen = j[None, :] <= qc
        dup = (tok[None, :] == q_tok) & (j[None, :] < qc)
        ind = (prev_tok[None, :] == q_tok) & (j[None, :] >= 1) & seen
        masks = torch.stack([(j == 0)[None, :].expand(n_rows, c), j[None, :] == qc, j[None, :] == qc - 1,
                             seen & (qc - j[None, :] < self.window), dup, ind], dim=-1).to(torch.float32)
        mass = torch.bmm(p.transpose(0, 1), masks).transpose(0, 1)  # [n, R, 6]
        total, top, sq = p.sum(-1), p.amax(-1), (p * p).sum(-1)
        self.column_mass[:, :c] += p.sum(1)
        self.column_near[:, :c] += (p * (seen & (qc - j[None, :] < self.long_range))).sum(1)

        strong = top > total / (q + 1)[None, :] * (1 + _FLAT)  # [n, R]
        k = torch.arange(self.max_offset + 1, device=d)
        key = qc - k[None, :]  # [R, K+1]
        valid = key >= 0
        win = p.gather(2, key.clamp(min=0)[None].expand(n, -1, -1))
        hits = (win == top[..., None]) & valid[None] & strong[..., None]
        first = (hits & (hits.cumsum(-1) == 1)).to(p.dtype)
        nxt = torch.tensor([self._tokens[x + 1] if x + 1 < len(self._tokens) else -2 for x in qs], device=d)
        holds = (tok[None, :] == nxt[:, None]) & seen  # [R, C]
        copy_elig = torch.tensor([f[2] for f in facts], device=d)
        copy_hit = ((torch.where(holds[None], p, -1.0).amax(-1) == top) & strong & copy_elig[None]).to(p.dtype)
        e = torch.tensor([1.0 if f[0] else 0.0 for f in facts], device=d)
        logs = torch.log((q + 1).to(torch.float32)).clamp(min=1e-30)
        entropy = torch.where(q[None] >= 1, -torch.log((sq / (total * total).clamp(min=1e-30)).clamp(min=1e-30))
                              / logs[None], torch.zeros_like(total))
        ind_m, dup_m = mass[..., 5], mass[..., 4]
        parts = torch.cat([mass, torch.stack([ind_m * e, dup_m * e, total, total * e, total * q[None].to(p.dtype),
                                              copy_hit, entropy], dim=-1), first], dim=-1)
        self.acc += parts.sum(1).to(self.dtype)
        self.n_induction_rows += sum(bool(f[0]) for f in facts)
        self.n_copy_rows += sum(f[2] for f in facts)

    # ---- reading ----------------------------------------------------------------------------------------
    def _cols(self) -> int:
        nz = np.flatnonzero(self.query_counts)
        return int(nz[-1]) + 1 if nz.size else 0

    def column_rows(self) -> np.ndarray:
        """`[C]`: how many recorded rows could see each key (rows with q >= j)."""
        c = self._cols()
        return np.cumsum(self.query_counts[:c][::-1])[::-1].copy()

    def rows_at_least(self) -> np.ndarray:
        """`[max_offset + 1]`: rows with q >= k, k = 0..max_offset."""
        rows = self.column_rows()
        out = np.zeros(self.max_offset + 1, np.int64)
        out[: min(rows.size, out.size)] = rows[: out.size]
        return out

    def uniform_share(self) -> np.ndarray:
        """`[C]`: the mean attention key j would receive if every row that saw it were uniform,
        mean over rows with q >= j of 1 / (q + 1)."""
        c = self._cols()
        per_query = self.query_counts[:c] / np.arange(1, c + 1)
        return np.cumsum(per_query[::-1])[::-1] / np.maximum(self.column_rows(), 1)

    def global_columns(self) -> torch.Tensor:
        """`[L*H, C]` bool: each head's global columns (see the module docstring)."""
        c = self._cols()
        rows = torch.as_tensor(self.column_rows(), dtype=torch.float32, device=self.device)
        floor = np.maximum(self.global_mean, self.global_lift * self.uniform_share())
        mean = self.column_mass[:, :c] / rows.clamp(min=1)
        return (mean >= torch.as_tensor(floor, dtype=torch.float32, device=self.device)) & (rows >= self.global_rows)

    def _scores_flat(self) -> dict[str, torch.Tensor]:
        def ratio(a: torch.Tensor, b) -> torch.Tensor:
            b = torch.as_tensor(b, dtype=self.dtype, device=self.device)
            return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))

        col = {name: self.acc[:, i] for i, name in enumerate(self._ACC)}
        total = col["total"]
        out = {name: ratio(col[name], total) for name in TL_PATTERNS}
        out["induction"] = ratio(col["e_induction"], col["e_total"])
        out["duplicate"] = ratio(col["e_duplicate"], col["e_total"])
        out["copying"] = ratio(col["copy_hits"], float(self.n_copy_rows))
        at_least = torch.as_tensor(self.rows_at_least()[1:], dtype=self.dtype, device=self.device)
        out["positional"] = ratio(self.acc[:, len(self._ACC) + 1 :], at_least[None, :]).max(-1).values
        c = self._cols()
        mass = self.column_mass[:, :c].to(self.dtype)
        g = self.global_columns()
        off = (~g).to(self.dtype)
        out["global"] = ratio((mass * g).sum(-1), total)
        far = (mass - self.column_near[:, :c].to(self.dtype)).clamp(min=0)
        out["long_range"] = ratio((far * off).sum(-1), total)
        sep = torch.tensor(self._separator[:c] + [False] * (c - min(c, len(self._separator))), device=self.device)
        out["syntax"] = ratio((mass * off * sep[None, :]).sum(-1), total)
        j = torch.arange(c, device=self.device, dtype=self.dtype)
        out["distance"] = ratio(col["q_total"] - mass @ j, total)
        out["entropy"] = ratio(col["entropy"], float(self.n_rows - self.query_counts[:1].sum()))
        return out

    def scores(self) -> dict[str, np.ndarray]:
        """`name -> [L, H]` float64 for every name in SCORES."""
        shape = (len(self.layers), len(self.heads))
        flat = self._scores_flat()
        return {name: flat[name].double().cpu().numpy().reshape(shape) for name in SCORES}

    def score(self, name: str, layer: int, head: int) -> float:
        return float(self.scores()[name][self._layer_index[layer], self._head_index[head]])

    def details(self, layer: int, head: int, max_columns: int = 8) -> dict:
        """What one head's scores rest on: its best offset and the offset distribution, its global columns
        (position, token id, mean attention received; strongest first) and the row counts."""
        return self._details_all(max_columns, only=(layer, head))[0]

    def _details_all(self, max_columns: int = 8, only: tuple[int, int] | None = None) -> list[dict]:
        n_heads = len(self.heads)
        idx = (range(len(self.layers) * n_heads) if only is None
               else [self._layer_index[only[0]] * n_heads + self._head_index[only[1]]])
        at_least = self.rows_at_least()
        hits = self.acc[:, len(self._ACC) :].double().cpu().numpy()
        share = hits[:, 1:] / np.maximum(at_least[1:], 1)[None, :]
        c = self._cols()
        rows = self.column_rows()
        mean = (self.column_mass[:, :c].double().cpu().numpy() / np.maximum(rows, 1)[None, :])
        glob = self.global_columns().cpu().numpy()
        out = []
        for i in idx:
            positions = sorted(np.flatnonzero(glob[i]).tolist(), key=lambda x: -mean[i, x])
            out.append({
                "offset": int(np.argmax(share[i])) + 1,
                "offset_shares": [round(float(s), 4) for s in share[i]],  # k = 1 .. max_offset
                "self_share": round(float(hits[i, 0] / max(at_least[0], 1)), 4),
                "global_columns": [{"position": x, "token_id": self._tokens[x] if x < len(self._tokens) else -1,
                                    "mean": round(float(mean[i, x]), 4)} for x in positions[:max_columns]],
                "num_global_columns": len(positions),
                "rows": self.n_rows,
                "induction_rows": self.n_induction_rows,
                "copying_rows": self.n_copy_rows,
            })
        return out

    # ---- saving -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Every accumulator as numpy (per-key arrays trimmed to the keys seen); `from_state` inverts it."""
        c = self._cols()
        return {
            "layers": np.asarray(self.layers, np.int64),
            "heads": np.asarray(self.heads, np.int64),
            "config": np.asarray([self.window, self.max_offset, self.long_range, self.global_mean,
                                  self.global_rows, self.global_lift], np.float64),
            "counts": np.asarray([self.n_induction_rows, self.n_copy_rows], np.int64),
            "acc": self.acc.double().cpu().numpy().copy(),
            "column_mass": self.column_mass[:, :c].cpu().numpy().copy(),
            "column_near": self.column_near[:, :c].cpu().numpy().copy(),
            "query_counts": self.query_counts[:c].copy(),
            "tokens": np.asarray(self._tokens, np.int64),
            "separator": np.asarray(self._separator, np.uint8),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], device: str | torch.device = "cpu") -> "HeadStats":
        cfg = np.asarray(state["config"], np.float64).reshape(-1)
        s = cls(np.asarray(state["layers"]).reshape(-1).tolist(), np.asarray(state["heads"]).reshape(-1).tolist(),
                window=int(cfg[0]), max_offset=int(cfg[1]), long_range=int(cfg[2]), global_mean=float(cfg[3]),
                global_rows=int(cfg[4]), global_lift=float(cfg[5]), device=device)
        acc = np.asarray(state["acc"], np.float64)
        if acc.shape != tuple(s.acc.shape):
            raise ValueError(f"head statistics: acc has shape {acc.shape}, expected {tuple(s.acc.shape)}")
        s.acc = torch.as_tensor(acc, dtype=s.dtype, device=s.device)
        s.column_mass = torch.as_tensor(np.asarray(state["column_mass"], np.float32), device=s.device).reshape(
            s.acc.shape[0], -1)
        s.column_near = torch.as_tensor(np.asarray(state["column_near"], np.float32), device=s.device).reshape(
            s.acc.shape[0], -1)
        s.query_counts = np.asarray(state["query_counts"], np.int64).reshape(-1).copy()
        s.n_induction_rows, s.n_copy_rows = (int(x) for x in np.asarray(state["counts"]).reshape(-1))
        tokens = [int(t) for t in np.asarray(state["tokens"]).reshape(-1)]
        separator = [bool(x) for x in np.asarray(state["separator"]).reshape(-1)]
        s._extend_tokens(tokens)
        s._separator = separator
        return s


# ---- separators ------------------------------------------------------------------------------------------
def is_separator_text(text: str) -> bool:
    """A token text that is only whitespace (newlines, indentation) or only punctuation (Unicode P*)."""
    if text == "" or "\ufffd" in text:  # empty or a partial UTF-8 byte: not a separator
        return False
    stripped = text.strip()
    return stripped == "" or all(unicodedata.category(ch) in _PUNCTUATION for ch in stripped)


def separator_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """bool `[vocab_size]`: True for separator tokens — special tokens (chat roles, end of text: boundaries),
    whitespace-only tokens and punctuation-only tokens (see `is_separator_text`). It decodes every
    token once (about a second for 50k tokens): `LLMEngine.separator_mask` keeps one per engine."""
    n = min(vocab_size, int(getattr(tokenizer, "vocab_size", vocab_size)))
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[:n] = torch.tensor([is_separator_text(tokenizer.decode([i])) for i in range(n)], dtype=torch.bool)
    for i in getattr(tokenizer, "special_token_ids", ()):
        if 0 <= i < vocab_size:
            mask[i] = True
    return mask


def separator_mask_from_texts(token_ids: Sequence[int], texts: Sequence[str]) -> torch.Tensor:
    """The separator mask over the ids of one sequence, from their texts (for dumps read without a tokenizer;
    special tokens are recognised by the `<|...|>` / `<...>` form of their text)."""
    ids = np.asarray(token_ids, np.int64)
    mask = torch.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=torch.bool)
    for i, text in zip(ids.tolist(), texts):
        special = len(text) > 2 and text.startswith("<") and text.endswith(">") and " " not in text
        mask[i] = is_separator_text(text) or special
    return mask
