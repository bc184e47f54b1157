"""One rank's place in the tensor-parallel group and its collectives, on torch.distributed.

The group is torch.distributed's default process group: gloo on CPU, NCCL on CUDA (with a second, gloo
group for the step headers, so that ranks > 0 wait for work in a CPU collective, not in an NCCL one). Rank 0
started the other ranks itself (a store on 127.0.0.1 at a port the system picks) or torchrun did (its RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT are in the environment).

Timeouts differ by rank on purpose: rank 0 only waits inside a step, where a live rank answers within one
layer's work, so a short timeout ends a step whose rank hangs; ranks > 0 wait for the next step for as long
as the engine idles. A rank that *exits* is noticed at once anyway: gloo reports the closed connection.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

RANK0_TIMEOUT = timedelta(seconds=120)
WORKER_TIMEOUT = timedelta(days=365)
LOAD_TIMEOUT = timedelta(minutes=30)  # every rank has loaded its shard of the checkpoint
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
JOINED_KEY = "kvmini/joined"


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: this process's rank, the group size, and rank 0's store (None: torchrun's env://)."""

    rank: int
    world_size: int
    host: str | None = None
    port: int | None = None
    local_rank: int = 0  # the rank among those on this machine: its GPU index

    @classmethod
    def from_env(cls) -> "Rendezvous | None":
        """The rendezvous torchrun (or any launcher setting its variables) gives this process, if any."""
        if not all(v in os.environ for v in TORCHRUN_VARIABLES) or int(os.environ["WORLD_SIZE"]) < 2:
            return None
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                   local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    def for_rank(self, rank: int) -> "Rendezvous":
        return Rendezvous(rank, self.world_size, self.host, self.port, rank)


def host_store(world_size: int) -> tuple[Rendezvous, dist.TCPStore]:
    """Rank 0 of a group it starts itself: a store on 127.0.0.1 at a port the system picks (no race for it)."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=RANK0_TIMEOUT, wait_for_workers=False)
    return Rendezvous(0, world_size, "127.0.0.1", store.port), store


def num_joined(store: dist.TCPStore) -> int:
    """Ranks that have reached the store so far (rank 0 watches this while its workers start)."""
    return store.add(JOINED_KEY, 0)


def default_threads(world_size: int) -> int:
    """torch threads per rank when none are given: this machine's share (torch's default, one per physical
    core, divided among the ranks here: torchrun's LOCAL_WORLD_SIZE, or all of them when self-started)."""
    return max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def rank_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device(device_type)


def join_group(rv: Rendezvous, device_type: str, store: dist.TCPStore | None = None) -> "TensorParallel":
    """Join (rank 0: form) the process group; returns this rank's collectives."""
    device = rank_device(device_type, rv.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = RANK0_TIMEOUT if rv.rank == 0 else WORKER_TIMEOUT
    if store is None and rv.host is not None:
        store = dist.TCPStore(rv.host, rv.port, rv.world_size, is_master=False, timeout=timeout)
    if store is not None:
        store.add(JOINED_KEY, 1)
        dist.init_process_group(backend, store=store, rank=rv.rank, world_size=rv.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rv.rank, world_size=rv.world_size, timeout=timeout)
    cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return TensorParallel(rv.rank, rv.world_size, device, cpu_group)


@dataclass
class TensorParallel:
    """This rank's collectives. The model's layers call `all_reduce`, its embedding `embed` and its head
    `gather_logits`; the runner and the workers call the rest (engine/exec/tp_step.py)."""

    rank: int
    world_size: int
    device: torch.device
    cpu_group: dist.ProcessGroup | None = None  # the step headers' gloo group (None: the default group is gloo)
    vocab_size: int = 0  # the whole vocabulary, to cut the head's padding rows off (set by `load_rank`)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial results in place (row-parallel o_proj and down_proj)."""
        dist.all_reduce(x)
        return x

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel embedding: the rank that holds a token's row gives it, the others zeros."""
        local = input_ids - self.rank * weight.shape[0]
        outside = (local < 0) | (local >= weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), weight)
        return self.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """This rank's vocabulary columns `[rows, V/N]` -> rank 0: every column `[rows, V]`; others: None."""
        joined = self.gather(logits, dim=1)
        return None if joined is None else joined[:, : self.vocab_size]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor | None:
        """Every rank's `x` (same shape everywhere) concatenated along `dim` in rank order, on rank 0."""
        x = x.to(self.device).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim) if parts is not None else None

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled: only ever our own step headers, between our own processes)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor] | None, specs: list[tuple[torch.dtype, tuple]]) -> list:
        """Rank 0's `tensors` on every rank (the others pass None and the `(dtype, shape)` of each): one
        broadcast per dtype, of all its tensors laid end to end."""
        out = list(tensors) if tensors is not None else [None] * len(specs)
        for dtype in dict.fromkeys(d for d, _ in specs):
            index = [i for i, (d, _) in enumerate(specs) if d == dtype]
            wire = torch.uint8 if dtype == torch.bool else dtype  # bool travels as bytes
            sizes = [math.prod(specs[i][1]) for i in index]
            if tensors is not None:
                flat = torch.cat([tensors[i].reshape(-1).to(self.device, wire) for i in index])
            else:
                flat = torch.empty(sum(sizes), dtype=wire, device=self.device)
            dist.broadcast(flat, src=0)
            if tensors is None:
                for i, part in zip(index, flat.split(sizes)):
                    out[i] = part.view(specs[i][1]).to(dtype)
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

