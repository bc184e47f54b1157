"""The one loop that drives `LLMEngine` for the server.

Threading model: the engine is not thread-safe, so *every* engine call (add_request, step, abort,
stats) runs on one dedicated engine thread. That thread steps back to back while there is work, as
vLLM's engine core does, and never waits for the event loop: the event loop posts commands (add,
abort) to a queue the thread drains between steps, and the thread hands each step's outputs to the
event loop in one `call_soon_threadsafe`. The asyncio side never touches the engine; it reads a
`stats()` snapshot the thread refreshes after each call.

    HTTP handler --submit()--> [command: add_request x n] --> RequestGroup (one asyncio.Queue)
    engine thread: while requests are unfinished: commands, step() -> event loop: dispatch each
                   RequestOutput to its group's queue (metrics: tokens, TTFT, inter-token latency)
    handler reads group.next() ... finally group.close(): unfinished members are aborted on the
                   engine thread before its next step (client gone, error, cancellation).

A request the engine ends on its own (finish_reason "error": `LLMEngine.step` ran the failed step's
sequences one by one and only this one failed) gets an error event; the others stream on. If `step()`
itself raises (outside any one request), the loop aborts the requests that step was running, hands
each of their groups an error event, and keeps serving the rest.

Shutdown (`drain`, on SIGTERM): new requests get 503, running ones have `--shutdown-timeout` seconds
to finish, then `end_all` gives each remaining stream a final error event and aborts it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engine.api.llm import LLM
from engine.capture.request import AttentionCapture
from engine.core.errors import RequestError
from engine.core.outputs import RequestOutput
from engine.sampling.params import SamplingParams
from server.errors import APIError
from server.metrics import Metrics

log = logging.getLogger("kvmini.server")

IDLE_RETRY_S = 0.005  # pause when a step had nothing to run but requests are pending (e.g. no free block)


class EngineStepError(RuntimeError):
    """The engine failed while running this request; it was aborted."""


@dataclass(eq=False)
class Member:
    """One engine request of a group (one choice)."""

    index: int
    request_id: str
    num_prompt_tokens: int
    finished: bool = False
    failed: bool = False
    last_token_time: float | None = None


@dataclass(frozen=True)
class Submission:
    prompt_token_ids: list[int]
    params: SamplingParams
    capture: AttentionCapture | None = None


class RequestGroup:
    """The engine requests of one HTTP request (its n choices), read in order through one queue.

    Use `next()` until it returns None, always `close()` in a `finally`: that aborts whatever is
    still running (a disconnected client, an exception, a cancelled task) so its blocks return now.
    """

    def __init__(self, loop: "EngineLoop", arrival: float):
        self._loop = loop
        self.arrival = arrival
        self.members: list[Member] = []
        self.queue: asyncio.Queue[tuple[str, Member, Any]] = asyncio.Queue()
        self.closed = False
        self.failed = False

    @property
    def done(self) -> bool:
        return all(m.finished or m.failed for m in self.members)

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next (choice index, output), None once every choice has finished.

        Raises `EngineStepError` if the engine failed on one of them (the group is then failed)."""
        if self.done and self.queue.empty():
            return None
        kind, member, payload = await self.queue.get()
        if kind == "error":
            self.failed = True
            raise EngineStepError(payload)
        return member.index, payload

    def close(self) -> None:
        """Abort the members still running (idempotent, never blocks, safe in `finally` when cancelled)."""
        if self.closed:
            return
        self.closed = True
        for m in self.members:
            if not (m.finished or m.failed):
                m.finished = True
                self._loop._abort_soon(m.request_id, "error" if self.failed else "aborted")


class EngineLoop:
    def __init__(self, llm: LLM, metrics: Metrics, max_waiting_requests: int):
        self.llm = llm
        self.engine = llm.engine
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()  # None = stop
        self._thread = threading.Thread(target=self._run, name="kvmini-engine", daemon=True)
        self._members: dict[str, tuple[RequestGroup, Member]] = {}
        self._stats: dict[str, float] = self.engine.stats()
        self._pending = 0  # requests handed to the engine thread for add_request, not added yet
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False  # shutting down: new requests are refused

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        self.end_all("the server is shutting down")
        self._commands.put(None)  # after the queued aborts: the thread runs them, then exits
        await asyncio.to_thread(self._thread.join)

    def drain(self, timeout: float) -> None:
        """Refuse new requests (503) and give the running ones `timeout` seconds to finish; then end the
        rest with a final error event. Call on the event loop (e.g. on SIGTERM)."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(timeout, self.end_all,
                                              f"the server is shutting down (not finished after {timeout:g} s)")

    def end_all(self, message: str) -> None:
        """End every unfinished request now: each stream gets an error event, each request is aborted."""
        for group, member in list(self._members.values()):
            group.queue.put_nowait(("error", member, message))  # ends its stream
            group.close()  # queues an abort for each of this loop's unfinished requests
            self.metrics.errors["shutdown"] += 1
        self._members.clear()

    # ---- what handlers use ------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, float]:
        """The latest `LLMEngine.stats()` (refreshed after every engine call)."""
        return self._stats

    def queued(self) -> int:
        """Requests accepted but not admitted by the scheduler yet."""
        return self._pending + int(self._stats.get("waiting", 0))

    async def submit(self, subs: list[Submission], arrival: float | None = None) -> RequestGroup:
        """Add one engine request per submission; 429 if the queue is full, 503 while shutting down,
        the engine's `RequestError` if it refuses one (then none is added)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.llm.failure is not None:  # e.g. a tensor-parallel rank exited: nothing can run any more
            raise APIError(503, self.llm.failure, code="engine_dead")
        if self.queued() + len(subs) > self.max_waiting_requests:
            raise APIError(
                429,
                f"too many requests waiting ({self.queued()} queued, limit {self.max_waiting_requests}); retry later",
                code="rate_limit_exceeded", headers={"Retry-After": "1"},
            )
        group = RequestGroup(self, arrival if arrival is not None else time.monotonic())
        specs = []
        for i, sub in enumerate(subs):
            rid = f"{self._prefix}-{next(self._ids)}"
            member = Member(i, rid, len(sub.prompt_token_ids))
            group.members.append(member)
            self._members[rid] = (group, member)
            specs.append((rid, sub))
        self._pending += len(subs)
        try:
            await asyncio.wrap_future(self._post(self._add_all, specs))
        except RequestError:
            for m in group.members:
                self._members.pop(m.request_id, None)
                m.failed = True
            raise
        except BaseException:
            group.close()  # cancelled while adding: whatever got added is aborted right after
            raise
        finally:
            self._pending -= len(subs)
        self.metrics.prompt_tokens += sum(len(s.prompt_token_ids) for s in subs)
        return group

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between steps; call from a thread that is *not* the event
        loop's (tests use it to drive the same LLM directly while the server is idle: `fn` must not step
        the engine while server requests are in flight, or their outputs go to `fn` instead)."""
        return self._post(fn).result()

    # ---- the event loop's side --------------------------------------------------------------------
    def _post(self, fn: Callable, *args) -> Future:
        """Queue `fn(*args)` for the engine thread, which runs it before its next step."""
        command = Command(fn, args)
        self._commands.put(command)
        return command.future

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        for out in outputs:
            entry = self._members.get(out.request_id)
            if entry is None:
                continue  # its client is gone; the abort is queued behind this step
            group, member = entry
            if out.new_token_ids:
                m.generation_tokens += len(out.new_token_ids)
                if member.last_token_time is None:
                    m.ttft.observe(now - group.arrival)
                else:
                    m.itl.observe(now - member.last_token_time)
                member.last_token_time = now
            if out.finish_reason == "error":  # the engine ended this request alone; its stream gets the error
                self._deliver_errors([out.request_id], f"the engine failed while running this request: {out.error}",
                                     out.error.split(":", 1)[0])
                continue
            if out.finished:
                member.finished = True
                del self._members[out.request_id]
                m.requests["finished"] += 1
            group.queue.put_nowait(("output", member, out))

    def _deliver_errors(self, request_ids: list[str], message: str, kind: str) -> None:
        for rid in request_ids:
            entry = self._members.pop(rid, None)
            if entry is None:
                continue
            group, member = entry
            member.failed = True
            self.metrics.requests["error"] += 1
            self.metrics.errors[f"engine:{kind}"] += 1
            group.queue.put_nowait(("error", member, message))

    def _abort_soon(self, request_id: str, outcome: str) -> None:
        """Queue an abort on the engine thread without waiting (usable while being cancelled)."""
        if self._members.pop(request_id, None) is None:
            return
        self.metrics.requests[outcome] += 1
        self._post(self._abort, request_id)

    # ---- on the engine thread only ----------------------------------------------------------------
    def _run(self) -> None:
        """The engine's own loop: steps back to back while there is work, never waiting on the event loop.

        Between steps it runs the queued commands (add, abort, run_sync); with nothing to run it sleeps
        on the command queue. Outputs go to the event loop in one callback per step."""
        while True:
            idle = not self.engine.has_unfinished()
            if not self._run_commands(block=idle):
                return
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self._step()
            except Exception as e:  # the engine failed: fail what it was running, keep serving
                log.exception("engine step failed")
                failed = self._fail_running()
                message = f"the engine failed while running this request: {type(e).__name__}: {e}"
                self._loop.call_soon_threadsafe(self._deliver_errors, failed, message, type(e).__name__)
                continue
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)
            elif not self.engine.scheduler.running:
                time.sleep(IDLE_RETRY_S)  # every request waits for free blocks: let aborts come in

    def _run_commands(self, block: bool) -> bool:
        """Run every queued command (waiting for one first when `block`); False once told to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while command is not None:
            command.run()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _add_all(self, specs: list[tuple[str, Submission]]) -> None:
        added = []
        try:
            for rid, sub in specs:
                self.engine.add_request(sub.prompt_token_ids, sub.params, request_id=rid, capture=sub.capture)
                added.append(rid)
        except BaseException:
            for rid in added:
                self.engine.abort(rid)
            raise
        finally:
            self._stats = self.engine.stats()

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        finally:
            self._stats = self.engine.stats()

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:
            log.exception("abort of %s failed", request_id)
        self._stats = self.engine.stats()

    def _fail_running(self) -> list[str]:
        """After a failed step: abort the requests it was running (all of them if that is unclear)."""
        engine = self.engine
        try:
            running = {id(s) for s in engine.scheduler.running}
            rids = [rid for rid, req in engine.requests.items() if id(req.seq) in running]
        except Exception:
            rids = []
        rids = rids or list(engine.requests)
        for rid in rids:
            self._abort(rid)
        return rids


@dataclass(eq=False)
class Command:
    """A call for the engine thread and the future that receives its result."""

    fn: Callable
    args: tuple
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(*self.args))
        except BaseException as e:  # handed to whoever waits on the future
            self.future.set_exception(e)
