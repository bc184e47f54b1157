"""A step across tensor-parallel ranks: rank 0's `StepInputs` reach every rank, captured heads come back.

Rank 0's ModelRunner builds the step once (token ids, positions, slot mapping, decode batches with their
key slots, masks and sink rotations, prefill segments, which rows get logits); nothing is rebuilt on the
other ranks. `send_step` splits it into a small picklable skeleton (the dataclasses with every tensor
replaced by its index and every CaptureSink by its position) and the tensors, which travel by
`dist.broadcast` (one per dtype); `receive_step` puts it back together. Each rank then runs `run_step`.

Attention capture: every rank captures all of its own heads (`every_head` sinks, from the capture specs in
the header); `join_captures` gathers each sink's per-head tensors on rank 0 in rank order, which is the
model's head order, and picks the requested heads there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass

import torch

from engine.capture.sink import CaptureSink, ValueNorms
from engine.core.comm import TensorParallel
from engine.exec.step import StepInputs
from engine.model.llama import LlamaModel

STOP = "stop"  # the header that ends the workers' loop


@dataclass(frozen=True)
class _TensorRef:
    index: int


@dataclass(frozen=True)
class _SinkRef:
    index: int


@dataclass
class StepHeader:
    """What travels pickled: the step without its tensors, their dtypes and shapes, and per capturing
    sequence the capture spec, its number of rows, its context length and its first position."""

    skeleton: StepInputs
    tensors: list[tuple]
    captures: list[tuple]


def send_step(tp: TensorParallel, step: StepInputs, sinks: list[CaptureSink]) -> None:
    """Rank 0: hand `step` (whose metadata refers to `sinks`) to every other rank."""
    tensors: list = []
    skeleton = _strip(step, tensors, {id(s): i for i, s in enumerate(sinks)})
    specs = [(t.dtype, tuple(t.shape)) for t in tensors]
    tp.broadcast_object(StepHeader(skeleton, specs, [(s.spec, s.num_rows, s.context, s.chunk_start) for s in sinks]))
    tp.broadcast_tensors(tensors, specs)


def receive_step(tp: TensorParallel, model: LlamaModel) -> tuple[StepInputs, list[CaptureSink]] | None:
    """Ranks > 0: wait for rank 0's next step; None when rank 0 says stop."""
    header = tp.broadcast_object()
    if header == STOP:
        return None
    tensors = tp.broadcast_tensors(None, header.tensors)
    cfg = model.config
    sinks = [CaptureSink(spec, cfg.num_hidden_layers, cfg.num_attention_heads, rows, context,
                         # No norms kept across steps here: every step computes all of its keys' norms.
                         ValueNorms(model, cfg.group_size) if spec.value_norms else None, every_head=True,
                         chunk_start=chunk_start)
             for spec, rows, context, chunk_start in header.captures]
    return _fill(header.skeleton, tensors, sinks), sinks


def join_captures(tp: TensorParallel, sinks: list[CaptureSink], num_heads: int) -> list[CaptureSink] | None:
    """Every rank: send each sink's heads to rank 0. Rank 0: the sinks over all `num_heads` heads."""
    joined = []
    for sink in sinks:
        parts = [tp.gather(t, dim) for t, dim in sink.head_tensors()]
        joined.append(sink.joined(num_heads, parts) if tp.rank == 0 else None)
    return joined if tp.rank == 0 else None


def _strip(obj, tensors: list, sink_index: dict[int, int]):
    """A copy of `obj` (dataclasses, lists, tuples, plain values) with tensors and sinks replaced by refs.
    Private dataclass fields (caches such as a segment's masks) are left out: each rank builds its own."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorRef(len(tensors) - 1)
    if isinstance(obj, CaptureSink):
        return _SinkRef(sink_index[id(obj)])
    if is_dataclass(obj):
        return type(obj)(**{f.name: _strip(getattr(obj, f.name), tensors, sink_index)
                            for f in fields(obj) if f.init and not f.name.startswith("_")})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(x, tensors, sink_index) for x in obj)
    return obj


def _fill(obj, tensors: list, sinks: list[CaptureSink]):
    """`_strip` undone with this rank's tensors and sinks."""
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    if isinstance(obj, _SinkRef):
        return sinks[obj.index]
    if is_dataclass(obj):
        return type(obj)(**{f.name: _fill(getattr(obj, f.name), tensors, sinks)
                            for f in fields(obj) if f.init and not f.name.startswith("_")})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(x, tensors, sinks) for x in obj)
    return obj
