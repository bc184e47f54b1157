"""Attention capture during the steps: what one forward pass collects and what comes back.

    CaptureSink        one sequence's rows during one forward pass, written by engine/model/attention.py's kernels
                       into one preallocated float32 buffer `[layers, heads, rows, keys]` on the device
    CaptureState       one sequence's capture across steps: prompt matrices until the prompt is done, the
                       value-norm cache, head statistics (engine/capture/head_stats.py)
    CaptureState.rows  a sink -> `AttentionRows`: top-k and span masses are reduced on the device, then each
                       result crosses to the host once per step

What a request asks for is an `AttentionCapture` (engine/capture/request.py). Capturing never changes what the
model computes: the decode kernel keeps its fused attention and the captured rows are computed beside it (from
the same queries and cached keys, as the reference's eager path does), and only for the layers a request
captures. See docs/ATTENTION.md.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.capture.request import AttentionCapture
from engine.core.outputs import AttentionRows, SpanMasses, TopKAttention


class CaptureSink:
    """One sequence's captured attention during one forward pass.

    A prompt chunk's layers call `record_prefill` (the chunk forms its probabilities anyway); a decode layer
    calls `defer_decode` with its query and gathered keys, and the runner calls `finish` after the forward
    pass to form all of them at once. Either way the rows of the trailing `num_rows` queries end in `probs`
    `[captured layers, captured heads, num_rows, context]`, float32 on the model's device (zeros past each
    row's query). `matrices` holds whole prompt chunks when a prefill matrix was asked.
    """

    def __init__(self, spec: AttentionCapture, num_layers: int, num_heads: int, num_rows: int, context: int,
                 value_norms: "ValueNorms | None" = None, every_head: bool = False, chunk_start: int = 0):
        self.spec = spec
        self.layers = spec.layers or tuple(range(num_layers))
        # every_head: a tensor-parallel rank's sink keeps all of its own heads; `joined` picks spec.heads later.
        self.wanted_heads = None if every_head else spec.heads
        self.heads = self.wanted_heads or tuple(range(num_heads))
        self.slot = dict(zip(self.layers, range(len(self.layers))))
        self.num_rows, self.context = num_rows, context
        self.chunk_start = chunk_start  # the position of the pass's first query (for prefill matrices)
        self.probs: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.matrices: dict[int, torch.Tensor] = {}
        self.value_norms = value_norms
        self.deferred: list[list] = []  # decode layers whose rows `finish` forms: [layer, q, keys, values]
        self.scale = 1.0
        self._head_index: torch.Tensor | None = None

    def wants(self, layer: int) -> bool:
        return layer in self.slot

    def _buffers(self, device, probs: bool = True) -> None:
        shape = (len(self.layers), len(self.heads), self.num_rows, self.context)
        # Zeros: a prefill row is shorter than the chunk's context (causal), and reductions read the whole row.
        if probs:
            self.probs = torch.zeros(shape, dtype=torch.float32, device=device)
        if self.spec.scores:
            self.scores = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
        if self.spec.value_norms:
            self.norms = torch.zeros(shape, dtype=torch.float32, device=device)
        if self.wanted_heads is not None:
            self._head_index = torch.tensor(self.wanted_heads, device=device)

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._head_index is None else x.index_select(0, self._head_index)

    def defer_decode(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None,
                     scale: float) -> None:
        """This sequence's one query `[KVH, G, D]` and its keys `[KVH, context, D]` at `layer` (values too
        for value norms): the rows are formed for every layer at once by `finish`."""
        self.deferred.append([layer, q, keys, values])
        self.scale = scale

    def finish(self) -> None:
        """Form the deferred decode rows: one stacked float32 product `q·Kᵀ/√d` and one softmax for all the
        captured layers (a few large operations instead of several small ones per layer: on a CPU the
        per-operation cost, not the arithmetic, is what capture would add). Float32, as the fused kernel
        accumulates; the reference's eager path rounds the scores to the model dtype first."""
        if not self.deferred:
            return
        layers, qs, keys, values = zip(*self.deferred)
        self.deferred = []
        q = torch.stack(qs).float().mul_(self.scale)  # [L, KVH, G, D]
        k = torch.stack(keys).float()  # [L, KVH, n, D], contiguous
        scores = torch.matmul(q, k.transpose(-1, -2))  # [L, KVH, G, n]
        n = scores.shape[-1]
        slots = [self.slot[layer] for layer in layers]
        every_layer = slots == list(range(len(self.layers)))  # the usual case: every captured layer, in order
        self._buffers(scores.device, probs=not every_layer)
        probs = torch.softmax(scores, dim=-1).view(len(layers), -1, 1, n)  # [L, H, 1, n]
        scores = scores.view(len(layers), -1, 1, n)
        if self._head_index is not None:
            probs, scores = probs.index_select(1, self._head_index), scores.index_select(1, self._head_index)
        if every_layer:
            self.probs = probs
        else:
            self.probs[slots] = probs
        if self.scores is not None:
            self.scores[slots] = scores
        if self.norms is not None:
            for i, (layer, v) in enumerate(zip(layers, values)):
                self.norms[slots[i], :, 0] = self.probs[slots[i], :, 0] * self._select(self.value_norms.of(layer, v))

    def record_prefill(self, layer: int, probs: torch.Tensor, scores: torch.Tensor, values: torch.Tensor,
                       first_position: int | None = None) -> None:
        """`probs`/`scores` `[heads, n, keys]` of a prompt chunk's queries; `values` `[KVH, keys, D]`.

        By default the n queries are the whole chunk and `keys` the context. With batch invariance a chunk
        comes in prompt tiles (engine/model/invariance.py): the n queries start at `first_position`, and their
        keys stop at the tile's end or the context, whichever comes first (zeros, -inf past them)."""
        if self.probs is None:
            self._buffers(probs.device)
        n, keys = probs.shape[1], probs.shape[2]
        first = self.context - n if first_position is None else first_position
        wanted = self.context - self.num_rows  # the first query the sink keeps
        i, lo = self.slot[layer], max(first, wanted)
        src, dst = slice(lo - first, n), slice(lo - wanted, first + n - wanted)
        probs = self._select(probs)
        self.probs[i, :, dst, :keys] = probs[:, src]
        if self.scores is not None:
            self.scores[i, :, dst, :keys] = self._select(scores)[:, src]  # the causal mask's -inf included
        if self.norms is not None:
            norms = self._select(self.value_norms.of(layer, values)).unsqueeze(1)
            self.norms[i, :, dst, :keys] = self.probs[i, :, dst, :keys] * norms
        if self.spec.prefill_matrix:
            self._keep_matrix(layer, probs.float().cpu(), first, keys)

    def _keep_matrix(self, layer: int, probs: torch.Tensor, first: int, keys: int) -> None:
        """The chunk's `[heads, chunk, context]` matrix, filled in as its queries come (all at once, or tile
        by tile from the chunk's first position `chunk_start`)."""
        if probs.shape[1:] == (self.context - self.chunk_start, self.context):
            self.matrices[layer] = probs
            return
        matrix = self.matrices.get(layer)
        if matrix is None:
            rows = self.context - self.chunk_start
            matrix = self.matrices[layer] = torch.zeros(probs.shape[0], rows, self.context)
        matrix[:, first - self.chunk_start : first - self.chunk_start + probs.shape[1], :keys] = probs

    # ---- tensor parallelism: each rank captures its own heads, rank 0 joins them (engine/exec) ----------
    def head_tensors(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor with an entry per head, with the dimension that holds the heads, in a fixed order."""
        parts = [(t, 1) for t in (self.probs, self.scores, self.norms) if t is not None]
        return parts + [(self.matrices[layer], 0) for layer in sorted(self.matrices)]

    def joined(self, num_heads: int, parts: list[torch.Tensor]) -> "CaptureSink":
        """This (`every_head`) sink over all `num_heads` heads of the model: `parts` are `head_tensors()` joined
        over every rank's heads in rank order; the requested heads are picked here, as one rank would have."""
        full = copy.copy(self)
        full.wanted_heads = self.spec.heads
        full.heads = self.spec.heads or tuple(range(num_heads))
        index = None if self.spec.heads is None else torch.tensor(self.spec.heads, device=parts[0].device)

        def pick(t: torch.Tensor, dim: int) -> torch.Tensor:
            return t if index is None else t.index_select(dim, index.to(t.device))

        remaining = iter(parts)
        for name in ("probs", "scores", "norms"):
            if getattr(self, name) is not None:
                setattr(full, name, pick(next(remaining), 1))
        full.matrices = {layer: pick(next(remaining), 0).cpu() for layer in sorted(self.matrices)}
        return full


class ValueNorms:
    """`||v_j W_O^h||` for every key j and query head h of a layer: how far key j's value moves the residual
    through head h (Kobayashi et al., 2020). With `G_h = W_O^hᵀ W_O^h` (`[D, D]`, once per layer) each key
    costs D² per head instead of D x hidden; the `[heads, context]` result is kept per sequence, so a
    decode step computes only the new key."""

    def __init__(self, model, group: int):
        self.model, self.group = model, group
        self._gram: dict[int, torch.Tensor] = {}
        self.cache: dict[int, torch.Tensor] = {}  # layer -> [heads, keys so far]

    def gram(self, layer: int) -> torch.Tensor:
        if layer not in self._gram:
            o_proj, cfg = self.model.layers[layer].o_proj, self.model.config
            h, d = cfg.num_attention_heads, cfg.head_dim
            weight = self.model.embed_tokens.weight
            eye = torch.eye(h * d, dtype=weight.dtype, device=weight.device)
            w = o_proj(eye).float()  # row i = W_O e_i: works for packed and quantized linears alike
            bias = getattr(o_proj, "bias", None)
            if bias is not None:
                w = w - bias.float()
            w = w.view(h, d, -1)  # [H, D, hidden]
            self._gram[layer] = w @ w.transpose(1, 2)  # [H, D, D]
        return self._gram[layer]

    def of(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """`[heads, context]` norms for the `[KVH, context, D]` values; new keys are computed, old ones reused."""
        n = values.shape[1]
        have = self.cache.get(layer)
        start = 0 if have is None else min(have.shape[1], n)
        if start < n:
            v = values[:, start:].float().repeat_interleave(self.group, dim=0)  # [H, new, D]
            new = torch.einsum("hnd,hde,hne->hn", v, self.gram(layer), v).clamp_min_(0).sqrt_()
            have = new if have is None or start == 0 else torch.cat([have[:, :start], new], dim=1)
            self.cache[layer] = have
        return have[:, :n]

    def truncate(self, num_tokens: int) -> None:
        """Forget the keys from `num_tokens` on (a session rewound: new tokens will take those positions)."""
        self.cache = {layer: norms[:, :num_tokens] for layer, norms in self.cache.items()}


@dataclass
class CaptureState:
    """One sequence's capture across steps (a request's, or a session's)."""

    spec: AttentionCapture
    num_prompt_tokens: int
    head_stats: object | None = None  # engine.capture.head_stats.HeadStats, when spec.head_stats
    value_norms: ValueNorms | None = None
    prefill_chunks: list[dict[int, torch.Tensor]] = field(default_factory=list)
    _span_index: torch.Tensor | None = field(default=None, repr=False)

    def sink(self, num_layers: int, num_heads: int, num_rows: int, context: int,
             every_head: bool = False, chunk_start: int = 0) -> CaptureSink:
        return CaptureSink(self.spec, num_layers, num_heads, num_rows, context, self.value_norms, every_head,
                           chunk_start)

    def keep_chunk(self, sink: CaptureSink) -> None:
        """Keep a prompt chunk's matrices until the prompt's last chunk has run."""
        chunk_len, context = next(iter(sink.matrices.values())).shape[1:]
        if chunk_len == context:  # the prompt's first chunk (again, after a preemption)
            self.prefill_chunks.clear()
        self.prefill_chunks.append(sink.matrices)

    def fork(self) -> "CaptureState":
        """An independent copy (a forked session): statistics and value norms so far, then their own."""
        child = copy.copy(self)
        child.head_stats = copy.deepcopy(self.head_stats)
        if self.value_norms is not None:
            child.value_norms = copy.copy(self.value_norms)
            child.value_norms.cache = dict(self.value_norms.cache)
        child.prefill_chunks = list(self.prefill_chunks)
        return child

    def rewind(self, num_tokens: int) -> None:
        """The sequence was cut to `num_tokens`: positions from there on will hold new tokens."""
        if self.value_norms is not None:
            self.value_norms.truncate(num_tokens)
        if self.head_stats is not None:
            self.head_stats.rewind(num_tokens)

    def rows(self, sink: CaptureSink, query_positions: Sequence[int]) -> list[AttentionRows]:
        """The sink's rows, one `AttentionRows` per query (the sink's trailing rows, in order)."""
        spec, probs = self.spec, sink.probs
        host = probs.cpu().numpy() if spec.full_rows else None
        top = _top_k(probs, spec.top_k) if spec.top_k is not None else None
        spans = self._span_masses(probs).cpu().numpy() if spec.spans is not None else None
        extra = {name: t.cpu().numpy() for name, t in (("scores", sink.scores), ("value_norms", sink.norms))
                 if t is not None}
        out = []
        for r, q in enumerate(query_positions):
            n = q + 1
            rows = AttentionRows(q, sink.heads, {layer: host[i, :, r, :n] for i, layer in enumerate(sink.layers)}
                                 if host is not None else {})
            if top is not None:
                rows.top = {layer: TopKAttention(top[0][i, :, r], top[1][i, :, r], top[2][i, :, r])
                            for i, layer in enumerate(sink.layers)}
            if spans is not None:
                rows.spans = SpanMasses(tuple(s.name for s in spec.spans),
                                        {layer: spans[i, :, r] for i, layer in enumerate(sink.layers)})
            for name, arr in extra.items():
                setattr(rows, name, {layer: arr[i, :, r, :n] for i, layer in enumerate(sink.layers)})
            out.append(rows)
        if out and sink.matrices:
            out[0].prefill = self._prefill(sink)
        return out

    def _prefill(self, sink: CaptureSink) -> dict[int, np.ndarray]:
        chunks = self.prefill_chunks or [sink.matrices]
        self.prefill_chunks = []
        return join_chunks(chunks)

    def _span_masses(self, probs: torch.Tensor) -> torch.Tensor:
        """`[layers, heads, rows, S + 2]`: each span's mass, then the generated tokens', then the rest of the
        prompt's, summed on the device with one scatter-add."""
        spans, context = self.spec.spans, probs.shape[-1]
        if self._span_index is None or self._span_index.device != probs.device:
            index = torch.full((self.num_prompt_tokens,), len(spans) + 1, dtype=torch.long)
            for i, s in enumerate(spans):
                index[s.start : s.end] = i
            self._span_index = index.to(probs.device)
        index = self._span_index[:context]
        if context > index.shape[0]:
            index = F.pad(index, (0, context - index.shape[0]), value=len(spans))
        out = probs.new_zeros(*probs.shape[:-1], len(spans) + 2)
        return out.scatter_add_(-1, index.expand_as(probs), probs)

    def update_stats(self, sink: CaptureSink, query_positions: Sequence[int], token_ids: list[int]) -> None:
        if self.head_stats is not None:
            self.head_stats.update(list(query_positions), sink.probs, token_ids)

    def update_stats_from_prompt(self, prefill: dict[int, np.ndarray], token_ids: list[int]) -> None:
        """Count the prompt's rows too (queries 0..P-2; the last prompt row is the first step's own row),
        from the prompt matrix a `prefill_matrix` request gets on its first step."""
        if self.head_stats is None or not prefill:
            return
        matrix = torch.from_numpy(np.stack([prefill[layer] for layer in self.head_stats.layers]))  # [L, H, P, P]
        if matrix.shape[-1] > 1:
            self.head_stats.update(range(matrix.shape[-1] - 1), matrix[:, :, :-1], token_ids)


def _top_k(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Key positions, probabilities and leftover mass of each row's k largest entries (ties: lower position)."""
    k = min(k, probs.shape[-1])
    values, positions = probs.topk(k, dim=-1, sorted=True)
    leftover = (1.0 - values.sum(-1)).clamp_(0.0, 1.0)
    return positions.cpu().numpy(), values.cpu().numpy(), leftover.cpu().numpy()


def join_chunks(chunks: list[dict[int, torch.Tensor]]) -> dict[int, np.ndarray]:
    """Per layer, the chunks' `[heads, chunk_len, context_so_far]` matrices as one `[heads, P, P]` matrix."""
    out = {}
    for layer in chunks[-1]:
        parts = [c[layer] for c in chunks]
        total = parts[-1].shape[-1]
        out[layer] = torch.cat([F.pad(p, (0, total - p.shape[-1])) for p in parts], dim=1).numpy()
    return out

