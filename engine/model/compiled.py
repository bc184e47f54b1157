"""The compiled decode step: embedding, every layer and the final norm as one `torch.compile`d graph per batch
bucket, with paged attention as an opaque op (`engine.model.attention.decode_attention`).

An eager decode step dispatches ~35 small operators per layer (norms, RoPE, slices, adds), each 3-10 us of
framework time on CPU: a third of a SmolLM2 step. Inductor fuses what sits between the matrix products into
a few generated C++ loops and calls the kernels that are already fast (oneDNN-packed linear, the int8/int4
weight-only kernels, SDPA inside the attention op) as they are. Batch sizes are rounded up to a bucket
(1, 2, 4, 8, 16) so that a handful of graphs serve every batch, as vLLM and nano-vllm capture one CUDA graph
per bucket; larger batches run in chunks of the largest bucket.
"""

from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.core.paths import kvmini_home
from engine.model.attention import GraphDecodeMeta
from engine.model.invariance import RowPlan, RowTile
from engine.model.llama import LlamaModel

log = logging.getLogger("kvmini.compiled")

BATCH_BUCKETS = (1, 2, 4, 8, 16)


def check_compile(device: torch.device, tensor_parallel_size: int, speculative: bool, kv_cache_dtype: str
                  ) -> None:
    """What `compile=True` does not take yet, refused rather than run in a way that breaks a guarantee."""
    if device.type != "cpu":
        raise ValueError(f"compile: the compiled decode step runs on CPU only so far (device {device}); "
                         "leave compile off on CUDA")
    if tensor_parallel_size > 1:
        raise ValueError("compile does not work with tensor_parallel_size > 1 yet")
    if kv_cache_dtype != "auto":  # the graph's attention op reads plain tensor pools
        raise ValueError(f"compile does not work with kv_cache_dtype {kv_cache_dtype!r} yet (only 'auto')")
    if speculative:
        # Verified drafts run as prompt rows (eager), plain decode steps through the graph: their rounding
        # differs, and speculative greedy output must be the same tokens as plain decoding.
        raise ValueError("compile and speculative decoding do not work together yet (their rows would round "
                         "differently, and speculation promises the tokens of plain decoding)")


def compile_cache_dir() -> Path:
    """Where inductor keeps what it compiled, so that a second start reuses it: `$TORCHINDUCTOR_CACHE_DIR`
    when set, else `$KVMINI_HOME/inductor` (default `~/.cache/kvmini/inductor`). Inductor's own keys name the
    graph (model shape, dtype, quantization), the torch version and the CPU's instruction set."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return kvmini_home() / "inductor"


def use_compile_cache() -> Path:
    """Point inductor at `compile_cache_dir()` (read from the environment when it first compiles)."""
    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def bucket(rows: int) -> int:
    """The smallest bucket holding `rows` (at most the largest bucket)."""
    return next(b for b in BATCH_BUCKETS if b >= rows)


@dataclass
class DecodeRows:
    """The decode rows of a step, as the compiled graph takes them (unpadded)."""

    input_ids: torch.Tensor  # [n]
    cos: torch.Tensor  # [n, 1, D]
    signed_sin: torch.Tensor  # [n, 1, D]
    slot_mapping: torch.Tensor  # [n]
    key_slots: torch.Tensor  # [n, L]
    context_lens: list[int]


def start_decoder(model: LlamaModel, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor],
                  batch_invariant: bool) -> CompiledDecoder:
    """A decoder with every batch bucket compiled now (through the on-disk cache), progress on this log."""
    log.info("compiling the decode step (cache: %s)", use_compile_cache())
    decoder = CompiledDecoder(model, batch_invariant)
    seconds = decoder.warm_up(k_pools, v_pools, model.rope, log.info)
    log.info("compiled the decode step in %.1f s", seconds)
    return decoder


class CompiledDecoder:
    """Runs decode rows through one compiled graph per batch bucket (each compiled on first use, or all at
    once by `warm_up`)."""

    def __init__(self, model: LlamaModel, batch_invariant: bool):
        self.model = model
        self.batch_invariant = batch_invariant
        # Dynamo keeps its graphs, and its limit of 8 per function, on the function's code object: a copy of
        # `_forward`'s code per decoder, so that several engines in one process do not share (and exhaust) it.
        forward = types.FunctionType(CompiledDecoder._forward.__code__.replace(), globals(), "_forward")
        self._graph = torch.compile(types.MethodType(forward, self), dynamic=False, fullgraph=True,
                                    options={"emulate_precision_casts": True})
        self.compiled: dict[int, float] = {}  # bucket -> seconds its first call took

    def _forward(self, input_ids, cos, sin, slot_mapping, key_slots, context_lens, k_pools, v_pools):
        rows = input_ids.shape[0]
        plan = RowPlan([RowTile(0, rows)]) if self.batch_invariant else None
        meta = GraphDecodeMeta(slot_mapping, key_slots, context_lens, self.batch_invariant, plan)
        x = F.embedding(input_ids, self.model.embed_tokens.weight)
        return self.model.forward_layers(x, cos, sin, meta, k_pools, v_pools)

    def run(self, rows: DecodeRows, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states `[n, hidden]` of the decode rows after the final norm; their K/V are written."""
        n = len(rows.context_lens)
        largest = BATCH_BUCKETS[-1]
        if n > largest:  # chunks in order: a later row may attend to an earlier row's K/V (a recomputed sequence)
            return torch.cat([self.run(_slice(rows, i, i + largest), k_pools, v_pools) for i in range(0, n, largest)])
        size = bucket(n)
        pad = size - n
        # Keys padded to a multiple of 16 (and at least 16) so that a 1-key context is not a special shape.
        keys = max(16, -(-rows.key_slots.shape[1] // 16) * 16)
        key_slots = F.pad(rows.key_slots, (0, keys - rows.key_slots.shape[1], 0, pad))
        lens = torch.tensor(rows.context_lens + [0] * pad)
        args = (_pad(rows.input_ids, pad), _pad(rows.cos, pad), _pad(rows.signed_sin, pad),
                _pad(rows.slot_mapping, pad), key_slots, lens)
        torch._dynamo.mark_dynamic(key_slots, 1)
        start = time.perf_counter()
        hidden = self._graph(*args, k_pools, v_pools)
        if size not in self.compiled:
            self.compiled[size] = time.perf_counter() - start
            log.info("compiled the decode step for batch %d in %.1f s", size, self.compiled[size])
        return hidden[:n]

    def warm_up(self, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], rope,
                progress: Callable[[str], None] | None = None) -> float:
        """Compile every bucket now (a server must not stall its requests for a compile later); returns the
        seconds it took. The dummy rows write one key into slot 0, which no sequence has yet."""
        start = time.perf_counter()
        device = k_pools[0].device
        cos, sin = rope.lookup(torch.zeros(1, dtype=torch.long, device=device), 1)
        for i, size in enumerate(BATCH_BUCKETS):
            if progress is not None:
                progress(f"compiling the decode step for batch {size} ({i + 1}/{len(BATCH_BUCKETS)})")
            zeros = torch.zeros(size, dtype=torch.long, device=device)
            self.run(DecodeRows(zeros, cos.repeat(size, 1, 1), sin.repeat(size, 1, 1),
                                zeros, zeros[:, None], [1] * size), k_pools, v_pools)
        return time.perf_counter() - start


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if rows == 0 else torch.cat((x, x.new_zeros(rows, *x.shape[1:])))


def _slice(rows: DecodeRows, start: int, stop: int) -> DecodeRows:
    return DecodeRows(rows.input_ids[start:stop], rows.cos[start:stop], rows.signed_sin[start:stop],
                      rows.slot_mapping[start:stop], rows.key_slots[start:stop], rows.context_lens[start:stop])
