"""One forward pass as every rank runs it: `StepInputs` (built by rank 0's runner, sent as is to the other
tensor-parallel ranks by engine/exec/tp_step.py), `run_step` (eager, or the decode rows through the compiled
graph), and `LocalExecutor`, how a single-process runner runs its steps."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine.cache.pools import KVCache
from engine.capture.sink import CaptureSink
from engine.model.attention import AttentionMetadata
from engine.model.compiled import CompiledDecoder, DecodeRows
from engine.model.invariance import RowPlan
from engine.model.llama import LlamaModel


@dataclass
class StepInputs:
    """One forward pass as every tensor-parallel rank runs it (`run_step`): built by rank 0's runner, sent as
    is to the other ranks (engine/exec/tp_step.py)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    max_position: int
    logit_rows: list[slice | list[int]]  # rows of the hidden states that get logits, one output head call each
    use_cache: bool = True  # False: attention over the new tokens only, the pools untouched (`full_logits`)
    batch_invariant: bool = False  # each logits row as alone (engine/model/invariance.py)


def run_step(model: LlamaModel, kv_cache: KVCache, step: StepInputs, sinks: list[CaptureSink],
             decoder: CompiledDecoder | None = None) -> list:
    """The forward pass, the captured rows and the logits of `step.logit_rows` (None on ranks > 0). With a
    compiled `decoder`, the decode rows go through its graph whenever `graph_rows` takes them."""
    pools = (kv_cache.k, kv_cache.v) if step.use_cache else (None, None)
    rows = graph_rows(model, step) if decoder is not None and step.use_cache else None
    if rows is None:
        hidden = model(step.input_ids, step.positions, step.meta, *pools, step.max_position)
    else:
        hidden = _run_split(model, decoder, step, rows, pools)
    for sink in sinks:
        sink.finish()
    return [model.compute_logits(hidden[rows], step.batch_invariant) for rows in step.logit_rows]


def graph_rows(model: LlamaModel, step: StepInputs) -> DecodeRows | None:
    """The step's decode rows as the compiled graph takes them, or None when the step runs eager: no decode
    rows, or a feature the graph does not carry (attention capture, StreamingLLM sink positions, head-aware
    eviction, tensor parallelism; a quantized KV cache is refused by `check_compile`)."""
    meta = step.meta
    if not meta.decode or meta.window is not None or model.tp is not None:
        return None
    if any(b.captures is not None or b.sink_rotation is not None for b in meta.decode):
        return None
    n = sum(len(b.context_lens) for b in meta.decode)
    positions = step.positions[:n]
    cos, sin = model.rope.lookup(positions, step.max_position)
    width = max(b.key_slots.shape[1] for b in meta.decode)
    key_slots = torch.cat([F.pad(b.key_slots, (0, width - b.key_slots.shape[1])) for b in meta.decode])
    return DecodeRows(step.input_ids[:n], cos, sin, meta.slot_mapping[:n], key_slots,
                      [n for b in meta.decode for n in b.context_lens])


def _run_split(model: LlamaModel, decoder: CompiledDecoder, step: StepInputs, rows: DecodeRows, pools
               ) -> torch.Tensor:
    """Prompt segments eager first (a recomputed sequence's decode rows attend to their K/V), then the decode
    rows through the graph; hidden states in flat-batch order (decode rows first)."""
    n = len(rows.context_lens)
    parts = []
    if step.meta.prefills:
        meta = step.meta
        prefills = [replace(seg, token_start=seg.token_start - n) for seg in meta.prefills]
        plan = None if meta.row_plan is None else RowPlan(
            [replace(t, start=t.start - n) for t in meta.row_plan.tiles if t.size])
        rest = AttentionMetadata(meta.slot_mapping[n:], [], prefills, row_plan=plan)
        parts.append(model(step.input_ids[n:], step.positions[n:], rest, *pools, step.max_position))
    decoded = decoder.run(rows, *pools)
    return decoded if not parts else torch.cat([decoded, *parts])


class LocalExecutor:
    """Runs a step in this process: the model and its KV cache are all there is (no tensor parallelism)."""

    every_head = False  # the captures here see every head without joining ranks' parts

    def __init__(self, model: LlamaModel, kv_cache: KVCache, decoder: CompiledDecoder | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.decoder = decoder

    def execute(self, step: StepInputs, sinks: list[CaptureSink]) -> tuple[list, list[CaptureSink]]:
        return run_step(self.model, self.kv_cache, step, sinks, self.decoder), sinks
