"""Attention over the paged KV cache: causal prefill per sequence and one-row batched decode.

Grouped-query attention never repeats K/V: queries are viewed as `[n_kv_heads, group, ...]` so each group
of query heads reads its one K/V head directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.cache.kv_quant import QuantizedPool
from engine.model.invariance import RowPlan

if TYPE_CHECKING:
    from engine.cache.head_plan import HeadSplit
    from engine.capture.sink import CaptureSink


@dataclass
class PrefillSegment:
    """A run of `num_tokens` consecutive new tokens of one sequence (a prompt or a prompt chunk).

    With batch invariance (engine/model/invariance.py) a segment is the real rows of one prompt tile of
    `tile_size` rows, at `tile_offset` in it: its queries are padded to the tile, and `key_slots` reach the
    tile's end (keys past the real ones are masked by causality), so its arithmetic has the tile's shape."""

    token_start: int  # first row in the flat token batch
    num_tokens: int
    key_slots: torch.Tensor | None  # [context] cache slots of every key up to this chunk; None = no cache
    capture: CaptureSink | None = None
    tile_size: int = 0  # 0: the segment is its own shape (no batch invariance)
    tile_offset: int = 0
    _masks: dict = field(default_factory=dict, repr=False)  # built by the first layer, reused by the rest

    @property
    def query_rows(self) -> int:
        return self.tile_size or self.num_tokens

    def causal_mask(self, group: int, context: int, dtype: torch.dtype, device) -> torch.Tensor:
        """`[group * Q, context]` for the Q query rows: 0 where query i (position context - Q + i) may attend,
        -inf after it; a bool mask (True = may attend) when `dtype` is torch.bool."""
        key = (group, context, dtype)
        if key not in self._masks:
            allowed = _causal_mask(self.query_rows, context, device).repeat(group, 1)
            if dtype != torch.bool:
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
            self._masks[key] = allowed
        return self._masks[key]


@dataclass
class DecodeBatch:
    """Consecutive decode rows (one new token per sequence) of similar context length, padded to the longest."""

    key_slots: torch.Tensor  # [batch, max_context] cache slots (padding points at slot 0)
    key_mask: torch.Tensor | None  # [batch, 1, 1, max_context] True = real key; None when lengths are equal
    context_lens: list[int]
    captures: list[CaptureSink | None] | None = None
    sink_rotation: SinkRotation | None = None  # rows with StreamingLLM positions (engine/cache/kv_policy.py)
    # Batch invariance: every row attends in its own call, over its own keys (`_attend_each_row`).
    per_row: bool = False


@dataclass
class SinkRotation:
    """Rows of a decode batch whose first `num_sink_tokens` gathered keys are rotated forward by their row's
    number of evicted tokens (cos and signed sin of that shift, `[rows, D]`): StreamingLLM's positions within
    the cache, applied to the gathered copy only; the pool keeps every key at its original position."""

    rows: list[int]
    num_sink_tokens: list[int]
    cos: torch.Tensor
    signed_sin: torch.Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor | None  # [tokens] where each new token's K/V go; None = no cache
    decode: list[DecodeBatch]  # the decode rows lead the flat batch, group after group
    prefills: list[PrefillSegment]
    window: WindowAttention | None = None  # head-aware eviction: where the window heads read and write
    row_plan: RowPlan | None = None  # batch invariance: how the linear layers split the rows (engine/model/invariance.py)


@dataclass
class WindowAttention:
    """The window heads' side of a head-aware step (engine/cache/head_plan.py): the same rows, laid out over the
    window pool's blocks (fewer keys once evicted), that pool's layers, and each layer's head split."""

    meta: AttentionMetadata
    k_pools: list
    v_pools: list
    splits: list[HeadSplit]


# Prefill chunks up to this many attention scores form them explicitly (one batched matmul with the mask
# added, softmax, matmul): 1.5-2x faster than SDPA's CPU kernel at these sizes. Larger ones (a long
# prompt given to `LLM.logits` in one piece) use SDPA, which never holds the whole score matrix.
PREFILL_MAX_EXPLICIT_SCORES = 1 << 24


@dataclass
class GraphDecodeMeta:
    """The decode rows of a compiled step (engine/model/compiled.py), as tensors only, so that one graph serves every
    context length: the keys reach attention through `decode_attention`, an op the compiler does not look into.
    Padded rows (up to the graph's batch bucket) have context length 0 and write nothing."""

    slot_mapping: torch.Tensor  # [B] where each row's new K/V go
    key_slots: torch.Tensor  # [B, L] cache slots of each row's keys (padding points at slot 0)
    context_lens: torch.Tensor  # [B] keys of each row; 0 for a padded row
    per_row: bool  # batch invariance: each row attends in its own call over exactly its keys
    row_plan: RowPlan | None = None
    window: None = None  # head-aware eviction runs eager


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     slot_mapping: torch.Tensor, key_slots: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     per_row: bool) -> torch.Tensor:
    """Write the real rows' K/V into the pools and attend each real row over its keys: the eager decode path
    (`_write_cache`, `_decode`) as one opaque op of a compiled graph (vLLM's `unified_attention` does the
    same), so that the graph has fixed shapes while contexts grow. q `[B, H, D]` -> `[B, H * D]`."""
    lens = [n for n in context_lens.tolist() if n]
    n = len(lens)
    _write_cache(k[:n], v[:n], k_pool, v_pool, slot_mapping[:n])
    mask = None
    if not per_row and min(lens) != key_slots.shape[1]:  # shorter rows, or keys padded past every row
        mask = (torch.arange(key_slots.shape[1], device=q.device) < context_lens[:n, None]).view(n, 1, 1, -1)
    out = _decode(q[:n], k_pool, v_pool, DecodeBatch(key_slots[:n], mask, lens, per_row=per_row), 0, scale)
    return out if n == q.shape[0] else torch.cat((out, out.new_zeros(q.shape[0] - n, out.shape[1])))


def _decode_attention_shape(q, k, v, k_pool, v_pool, slot_mapping, key_slots, context_lens, scale, per_row):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# Registered through torch.library.Library rather than the `custom_op` decorator: the decorator's Python
# wrapper costs ~80 us a call on CPU (30 calls a token), the plain registration ~20 us.
_OPS = torch.library.Library("kvmini", "FRAGMENT")
_OPS.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, "
            "Tensor slot_mapping, Tensor key_slots, Tensor context_lens, float scale, bool per_row) -> Tensor")
_OPS.impl("decode_attention", decode_attention, "CompositeExplicitAutograd")
torch.library.register_fake("kvmini::decode_attention", _decode_attention_shape, lib=_OPS)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor | None,
    v_pool: torch.Tensor | None,
    meta: AttentionMetadata,
    layer: int,
    scale: float,
) -> torch.Tensor:
    """q `[T, H, D]`, k/v `[T, KVH, D]` for the new tokens -> output `[T, H * D]`."""
    if isinstance(meta, GraphDecodeMeta):
        return torch.ops.kvmini.decode_attention(q, k, v, k_pool, v_pool, meta.slot_mapping, meta.key_slots,
                                                 meta.context_lens, scale, meta.per_row)
    if meta.window is not None:
        return _split_attention(q, k, v, k_pool, v_pool, meta, layer, scale)
    return _attend(q, k, v, k_pool, v_pool, meta, layer, scale)


def _split_attention(q, k, v, k_pool, v_pool, meta: AttentionMetadata, layer: int, scale: float) -> torch.Tensor:
    """Head-aware eviction: the layer's full heads attend through `meta` over their pool, its window heads
    through `meta.window` over theirs; each part is grouped-query attention of its KV heads' query groups."""
    t, h, d = q.shape
    w, split = meta.window, meta.window.splits[layer]
    out = q.new_empty(t, h, d)
    for q_heads, kv_heads, kp, vp, m in ((split.full_q, split.full_kv, k_pool, v_pool, meta),
                                         (split.window_q, split.window_kv, w.k_pools[layer], w.v_pools[layer], w.meta)):
        if len(kv_heads):
            part = _attend(q.index_select(1, q_heads), k.index_select(1, kv_heads), v.index_select(1, kv_heads),
                           kp, vp, m, layer, scale)
            out.index_copy_(1, q_heads, part.view(t, -1, d))
    return out.view(t, h * d)


def _attend(q, k, v, k_pool, v_pool, meta: AttentionMetadata, layer: int, scale: float) -> torch.Tensor:
    if meta.slot_mapping is not None:
        _write_cache(k, v, k_pool, v_pool, meta.slot_mapping)
    # Decode rows lead the flat batch and prefill segments follow in order, so the parts concatenate.
    parts, row = [], 0
    for batch in meta.decode:
        n = len(batch.context_lens)
        parts.append(_decode(q[row : row + n], k_pool, v_pool, batch, layer, scale))
        row += n
    for seg in meta.prefills:
        rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
        parts.append(_prefill(q[rows], k[rows], v[rows], k_pool, v_pool, seg, layer, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write_cache(k, v, k_pool, v_pool, slot_mapping) -> None:
    if isinstance(k_pool, QuantizedPool):  # kv_cache_dtype int8 / fp8_e4m3: quantized as written
        k_pool.write(slot_mapping, k)
        v_pool.write(slot_mapping, v)
        return
    kvh, d = k.shape[1], k.shape[2]
    k_pool.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_pool.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def _decode(q, k_pool, v_pool, batch: DecodeBatch, layer: int, scale: float) -> torch.Tensor:
    """One query row per head against each sequence's cached keys, gathered through its block table."""
    b, h, d = q.shape
    kvh = k_pool.shape[2]
    keys = _gather(k_pool, batch.key_slots).transpose(1, 2)  # [B, KVH, L, D]
    values = _gather(v_pool, batch.key_slots).transpose(1, 2)
    if batch.sink_rotation is not None:
        rotate_sink_keys(keys, batch.sink_rotation)
    qg = q.view(b, kvh, h // kvh, d)  # the G query heads of a group are G query rows of its K/V head
    if batch.per_row:
        out = _attend_each_row(qg, keys, values, batch, scale)
    else:
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=batch.key_mask, scale=scale)
    if batch.captures is not None:
        _capture_decode(qg, keys, values, batch, layer, scale)
    return out.reshape(b, h * d)


def _attend_each_row(qg, keys, values, batch: DecodeBatch, scale: float) -> torch.Tensor:
    """Batch invariance: each row in its own call over exactly its keys, unpadded and unmasked, so that its
    shape is its own (a batched call's rounding moved with the batch and its padding: float32 on two
    threads). The rows' keys are views of the batch's one gather, laid out as a gather of the row alone."""
    outs = [F.scaled_dot_product_attention(qg[i : i + 1], keys[i : i + 1, :, :n], values[i : i + 1, :, :n],
                                           scale=scale) for i, n in enumerate(batch.context_lens)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of `pool` (`[blocks, block_size, KVH, D]`) at cache `slots` `[..., L]` -> `[..., L, KVH, D]`."""
    if isinstance(pool, QuantizedPool):
        return pool.gather(slots)  # dequantized into the model's dtype
    flat = pool.view(-1, pool.shape[2], pool.shape[3])
    # index_select copies whole rows; it is several times faster than advanced indexing here.
    return flat.index_select(0, slots.reshape(-1)).view(*slots.shape, pool.shape[2], pool.shape[3])


def rotate_sink_keys(keys: torch.Tensor, rotation: SinkRotation) -> None:
    """Rotate, in place, the sink keys of `keys` `[B, KVH, L, D]` (a gathered copy) by each row's shift.

    RoPE rotations compose: a key stored at position j, rotated by the shift's angles, is the key RoPE gives
    at position j + shift (HF's half-split layout, as `engine.model.llama.apply_rope`)."""
    half = keys.shape[-1] // 2
    for i, (row, n) in enumerate(zip(rotation.rows, rotation.num_sink_tokens)):
        sink = keys[row, :, :n]
        keys[row, :, :n] = sink * rotation.cos[i] + sink.roll(half, dims=-1) * rotation.signed_sin[i]


def _capture_decode(qg, keys, values, batch: DecodeBatch, layer: int, scale: float) -> None:
    """Hand the capturing sequences' query and keys of this layer to their sinks, beside the fused kernel's
    output (which stays the fast path for every row); the sink forms the rows of all its layers at once
    after the forward pass (engine/capture/sink.py)."""
    alone = len(batch.context_lens) == 1
    for i, sink in enumerate(batch.captures):
        if sink is not None and sink.wants(layer):
            n = batch.context_lens[i]
            # Alone in its batch, the gathered keys are its own (kept by reference); in a batch, its slice
            # is copied so that the whole batch's keys are not held until the step ends.
            own = (lambda t: t) if alone else torch.clone
            v = own(values[i, :, :n]) if sink.spec.value_norms else None
            sink.defer_decode(layer, qg[i], own(keys[i, :, :n]), v, scale)


def _prefill(q, k, v, k_pool, v_pool, seg: PrefillSegment, layer: int, scale: float) -> torch.Tensor:
    """Causal attention of a chunk's queries over all keys so far (cached prefix plus the chunk)."""
    t, h, d = q.shape
    kvh, g = k.shape[1], h // k.shape[1]
    ctx = t if seg.key_slots is None else seg.key_slots.shape[0]
    if ctx > t or seg.tile_size:  # a cached prefix precedes the chunk, or a tile: read every key from the pool
        k, v = _gather(k_pool, seg.key_slots), _gather(v_pool, seg.key_slots)
    rows, off = seg.query_rows, seg.tile_offset
    if rows != t:  # a tile's real rows at their offset, zeros around them
        q = q.new_zeros(rows, h, d).index_copy_(0, torch.arange(off, off + t, device=q.device), q)
    # [KVH, G*Q, D]: the group's query rows stacked so they share one K/V head (no repeat).
    qg = q.view(rows, kvh, g, d).permute(1, 2, 0, 3).reshape(kvh, g * rows, d)
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [KVH, ctx, D]
    sink = seg.capture if seg.capture is not None and seg.capture.wants(layer) else None
    if sink is None and kvh * g * rows * ctx > PREFILL_MAX_EXPLICIT_SCORES:
        mask = seg.causal_mask(g, ctx, torch.bool, q.device)
        out = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask, scale=scale)
    else:
        bias = seg.causal_mask(g, ctx, q.dtype, q.device).expand(kvh, -1, -1)
        scores = torch.baddbmm(bias, qg, kt.transpose(1, 2), alpha=scale)  # [KVH, G*Q, ctx]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if sink is not None:
            _record_prefill(sink, layer, probs.view(h, rows, ctx), scores.view(h, rows, ctx), vt, seg)
        out = torch.matmul(probs.to(vt.dtype), vt)
    out = out.view(kvh, g, rows, d).permute(2, 0, 1, 3)
    return (out if rows == t else out[off : off + t]).reshape(t, h * d)


def _record_prefill(sink: CaptureSink, layer: int, probs, scores, values, seg: PrefillSegment) -> None:
    """Hand a segment's real rows `[heads, rows, ctx]` to its sink; a tile's keys past the sink's context
    (the chunk's end) are masked for every real row and left out."""
    if not seg.tile_size:
        sink.record_prefill(layer, probs, scores, values)
        return
    rows = slice(seg.tile_offset, seg.tile_offset + seg.num_tokens)
    keys = min(probs.shape[-1], sink.context)
    first = seg.key_slots.shape[0] - seg.tile_size + seg.tile_offset  # the position of the first real row
    sink.record_prefill(layer, probs[:, rows, :keys], scores[:, rows, :keys], values[:, :keys], first)


def _causal_mask(q_len: int, ctx: int, device) -> torch.Tensor:
    """Query i (absolute position ctx - q_len + i) sees keys 0..ctx - q_len + i."""
    q_pos = torch.arange(ctx - q_len, ctx, device=device).unsqueeze(1)
    return torch.arange(ctx, device=device).unsqueeze(0) <= q_pos


def group_by_length(context_lens: list[int], max_padding: int, max_keys: int) -> list[int]:
    """Sizes of consecutive runs of ascending `context_lens`: padding a run to its longest member adds at
    most `max_padding` key positions, and a run of more than one member holds at most `max_keys` keys."""
    sizes: list[int] = []
    count = total = 0
    for length in context_lens:
        padded = (count + 1) * length
        if count and (padded - (total + length) > max_padding or padded > max_keys):
            sizes.append(count)
            count = total = 0
        count += 1
        total += length
    if count:
        sizes.append(count)
    return sizes
