"""Ranks 1..N-1: rank 0 starts them (or torchrun did), watches them and stops them; they run the model only.

    rank 0 (LLM)                                   rank r > 0 (run_worker)
    WorkerGroup.start: spawn ranks, form group ──► join group
    send RankSpec (model dir, dtype, blocks...) ──► receive it
    load_rank: its shard, its KV pool              load_rank: its shard, a pool of the same blocks
    wait_ready (monitored barrier) ◄─────────────► barrier
    per step: send_step, run_step, join_captures ◄► receive_step, run_step, join_captures (all-reduces inside)
    close: STOP header, join (kill if stuck) ─────► loop ends, group destroyed, exit 0

A rank that exits makes rank 0's next collective fail at once (gloo reports the closed connection) or is
seen before the next step starts (`check`); either way the engine raises `EngineDeadError` naming the rank
and stays dead. A failure on rank 0 in the middle of a step leaves the other ranks waiting in a collective
that will never come, so it is fatal too: the workers are killed rather than left hanging.
"""

from __future__ import annotations

import multiprocessing.connection
import signal
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.cache.pools import KVCache
from engine.capture.sink import CaptureSink
from engine.core.comm import (
    LOAD_TIMEOUT,
    RANK0_TIMEOUT,
    Rendezvous,
    TensorParallel,
    default_threads,
    host_store,
    join_group,
    num_joined,
)
from engine.core.config import ModelConfig
from engine.core.errors import EngineDeadError
from engine.exec.shard import RankSpec, load_rank
from engine.exec.step import StepInputs, run_step
from engine.exec.tp_step import STOP, join_captures, receive_step, send_step
from engine.model.llama import LlamaModel

EXIT_GRACE_S = 10.0  # after the stop header, how long a rank gets to exit before it is killed
REAP_WAIT_S = 1.0  # after a failed collective, how long to wait for the rank behind it to be seen exiting


class WorkerGroup:
    """Rank 0's handle on the other ranks: their collectives (`tp`), their processes when it started them
    (none under torchrun), and why the group is dead, once it is (`failure`)."""

    def __init__(self, processes: list[multiprocessing.Process]):
        self.processes = processes  # processes[i] is rank i + 1
        self.tp: TensorParallel | None = None
        self.failure: str | None = None
        self.closed = False

    @classmethod
    def start(cls, size: int, device_type: str, threads: int | None) -> "WorkerGroup":
        """Join torchrun's group as its rank 0, or start ranks 1..size-1 on this machine and form one."""
        launched = Rendezvous.from_env()
        if launched is not None:
            if launched.world_size != size:
                raise ValueError(f"tensor_parallel_size is {size} but the launcher started {launched.world_size} "
                                 f"processes (WORLD_SIZE)")
            if launched.rank != 0:
                raise RuntimeError("only rank 0 builds an LLM; the other ranks run "
                                   "engine.exec.workers.run_worker() (the kvmini CLI does so by itself)")
            group = cls([])
            group.tp = join_group(launched, device_type)
            return group
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group (another tensor-parallel "
                               "LLM?): close that one first")
        rv, store = host_store(size)
        spawn = mp.get_context("spawn")  # a fresh interpreter: no forked torch threads or CUDA state
        group = cls([spawn.Process(target=worker_main, args=(rv.for_rank(r), device_type, threads),
                                   name=f"kvmini-tp-rank{r}", daemon=True) for r in range(1, size)])
        for p in group.processes:
            p.start()
        try:
            group._wait_joined(store, RANK0_TIMEOUT.total_seconds())
            group.tp = join_group(rv, device_type, store)
        except BaseException as e:
            exited = group._exited()
            group._dead(e, exited and f"{exited} while starting (its traceback is above)")
            group.close()
            raise EngineDeadError(group.failure) from e
        return group

    def _wait_joined(self, store, timeout_s: float) -> None:
        """Wait for every spawned rank to reach the store, watching the processes: one that fails to start (an
        import error, a script without `if __name__ == "__main__":`) is reported at once, not after a timeout."""
        deadline = time.monotonic() + timeout_s
        while num_joined(store) < len(self.processes):
            if self._exited() is not None:
                raise RuntimeError("a rank exited while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tensor-parallel ranks did not start within {timeout_s:g} s")
            multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout=0.05)

    def load(self, spec: RankSpec, config: ModelConfig) -> tuple[LlamaModel, KVCache]:
        """Every rank loads its shard of `spec` (rank 0's here, returned); returns when all are ready. On any
        failure (rank 0's own, such as a bad checkpoint, raised as it is) the group is ended."""
        try:
            with self.collective():
                self.tp.broadcast_object(spec)
            model_and_cache = load_rank(spec, config, self.tp.device, self.tp)
            with self.collective():
                dist.monitored_barrier(group=self.tp.cpu_group, timeout=LOAD_TIMEOUT, wait_all_ranks=True)
        except BaseException as e:
            self._dead(e)
            self.close()
            raise
        return model_and_cache

    @contextmanager
    def collective(self):
        """Around rank 0's collectives: refuse to start when a rank is gone; a failure inside (a rank exited or
        timed out, or this rank raised while the others wait) ends the group for good."""
        self.check()
        try:
            yield
        except BaseException as e:
            self._dead(e)
            if isinstance(e, Exception):
                raise EngineDeadError(self.failure) from e
            raise

    def check(self) -> None:
        """Raise EngineDeadError if the group is dead or one of its processes has exited."""
        if self.failure is None and (exited := self._exited()) is not None:
            self._dead(None, exited)
        if self.failure is not None:
            raise EngineDeadError(self.failure)

    def _exited(self) -> str | None:
        """Every rank that has exited (the one that died first may not be the lowest: the others then fail in
        their collectives and exit too)."""
        gone = [f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                for rank, p in enumerate(self.processes, 1) if p.exitcode is not None]
        return f"tensor-parallel {', '.join(gone)}" if gone else None

    def _dead(self, error: BaseException | None, reason: str | None = None) -> None:
        if self.failure is not None:
            return
        if reason is None and self.processes:
            # A rank that died shows up first as a closed connection; give its process a moment to be reaped
            # (its socket closes before the kernel reports its exit, so poll rather than wait on its sentinel).
            deadline = time.monotonic() + REAP_WAIT_S
            while (reason := self._exited()) is None and time.monotonic() < deadline:
                time.sleep(0.01)
        if reason is None:
            reason = (f"a tensor-parallel step failed half-way ({type(error).__name__}: {error}), so the ranks are "
                      f"out of step")
        self.failure = f"{reason}; the engine cannot run any more (start a new one)"
        self.kill()

    def kill(self) -> None:
        """End the other ranks now (they may be stuck in a collective that will never complete)."""
        for p in self.processes:
            if p.is_alive():
                p.kill()
            p.join()

    def close(self) -> None:
        """Stop every rank (idempotent; also run at garbage collection and interpreter exit): the stop header,
        a few seconds to exit, then kill; then leave the process group."""
        if self.closed:
            return
        self.closed = True
        if self.failure is None and self.tp is not None and self._exited() is None:
            try:
                self.tp.broadcast_object(STOP)
            except Exception:  # noqa: BLE001 - a rank that is gone is killed below either way
                pass
            for p in self.processes:
                p.join(EXIT_GRACE_S)
        self.kill()
        if self.tp is not None:
            self.tp.close()


class TensorParallelExecutor:
    """How rank 0's runner runs a step over the group: every other rank gets the step first, all run their shard
    (all-reduces inside), and the captured heads of every rank are joined afterwards (engine/exec/tp_step.py)."""

    every_head = True  # each rank captures its own heads; the sinks keep all of them for the join
    decoder = None  # the compiled step does not run tensor-parallel (engine/model/compiled.py `check_compile`)

    def __init__(self, group: WorkerGroup, model: LlamaModel, kv_cache: KVCache, num_heads: int):
        self.group = group
        self.model = model
        self.kv_cache = kv_cache
        self.num_heads = num_heads  # the whole model's query heads

    def execute(self, step: StepInputs, sinks: list[CaptureSink]) -> tuple[list, list[CaptureSink]]:
        tp = self.group.tp
        with self.group.collective():
            send_step(tp, step, sinks)
            logits = run_step(self.model, self.kv_cache, step, sinks)
            joined = join_captures(tp, sinks, self.num_heads)
        return logits, joined


def worker_main(rv: Rendezvous, device_type: str, threads: int | None) -> None:
    """A spawned rank's process (its traceback, if any, goes to stderr and its exit code to rank 0)."""
    # Ctrl-C in a terminal reaches the whole process group; rank 0 alone decides when the ranks stop (a
    # draining server still needs them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(run_worker(rv, device_type, threads))


def run_worker(rv: Rendezvous, device_type: str = "cpu", threads: int | None = None) -> int:
    """Rank rv.rank > 0: join the group, load the shard rank 0 names, run steps until rank 0 says stop."""
    torch.set_num_threads(threads if threads is not None else default_threads(rv.world_size))
    tp = join_group(rv, device_type)
    try:
        spec: RankSpec = tp.broadcast_object()
        model, kv_cache = load_rank(spec, ModelConfig.from_dir(spec.model_dir), tp.device, tp)
        dist.monitored_barrier(group=tp.cpu_group, timeout=LOAD_TIMEOUT, wait_all_ranks=True)
        with torch.inference_mode():
            while (received := receive_step(tp, model)) is not None:
                step, sinks = received
                run_step(model, kv_cache, step, sinks)
                join_captures(tp, sinks, model.config.num_attention_heads)
    finally:
        tp.close()
    return 0
