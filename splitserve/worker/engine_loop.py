"""The engine thread: one LLMEngine, stepped on its own thread, reached from asyncio by call().

LLMEngine is single-threaded by design. A service owns one EngineLoop; its gRPC handlers and tasks
run on the asyncio event loop and touch the engine only through ``await loop.call(fn)``, which runs
``fn(engine)`` on the engine thread between two steps. After every step the thread hands a
``StepResult`` to the ``on_step`` callback on the event loop, so a long prefill never blocks the
event loop and the event loop never races the engine.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from splitserve.common.step_stats import StepStats
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request import StepOutput

log = structlog.get_logger(__name__)
R = TypeVar("R")


@dataclass(frozen=True)
class StepResult:
    """One engine step as seen from the event loop."""

    outputs: list[StepOutput]
    started: float  # wall-clock seconds, time.time()
    ended: float
    # Whatever the service's after_step hook read from the engine on its thread (e.g. block tables).
    extra: Any = None


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future = field(repr=False)


class EngineLoop:
    """Steps an engine on a dedicated thread while it has work; runs calls between steps."""

    def __init__(self, engine: LLMEngine, on_step: Callable[[StepResult], None],
                 after_step: Callable[[LLMEngine, list[StepOutput]], Any] | None = None,
                 snapshot: Callable[[LLMEngine], Any] | None = None) -> None:
        self.engine = engine
        self._on_step = on_step
        self._after_step = after_step
        self._snapshot_fn = snapshot
        # What snapshot(engine) returned after the latest step or call, taken on the engine thread:
        # readable at any time without waiting for a step (heartbeats must not wait seconds).
        self.snapshot: Any = snapshot(engine) if snapshot else None
        # (version, routing keys) of the engine's cached blocks, refreshed with the snapshot.
        self.published_cache = engine.published_cache()
        self.steps = StepStats()  # every step's wall and CPU time, by kind and batch
        self._calls: queue.Queue[_Call | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: asyncio.Future | None = None  # set with the exception if a step raises
        self._dead = False  # a step failed: the thread is gone and no call will ever run
        self._dead_lock = threading.Lock()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.failed = self._loop.create_future()
        self._thread.start()

    async def call(self, fn: Callable[[LLMEngine], R]) -> R:
        """Run fn(engine) on the engine thread; its exception, if any, is raised here."""
        future = self._loop.create_future()
        with self._dead_lock:
            if self._dead:
                raise RuntimeError("the engine failed; it runs nothing more")
            self._calls.put(_Call(fn, future))
        return await future

    async def stop(self) -> None:
        self._calls.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        while True:
            if not self._drain_calls():
                return
            if self._can_step():
                self._step()

    def _can_step(self) -> bool:
        """Work to do that a step can start: not when the last step found nothing it could run (a
        prompt waiting for blocks held for pulls), until a call (a Release, an Abort, a new request)
        changed something."""
        return self.engine.has_work and not self.engine.stalled

    def _drain_calls(self) -> bool:
        """Run every queued call, blocking for the first one when the engine is idle or stalled.

        Returns False when stop() was requested.
        """
        block = not self._can_step()
        while True:
            if block:  # idle from here: what the heartbeats publish must be up to date
                self.published_cache = self.engine.published_cache(now=True)
            try:
                item = self._calls.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            self._run_call(item)
            self.engine.stalled = False  # the call may have freed blocks or queued work: step again
            block = not self._can_step()

    def _run_call(self, item: _Call) -> None:
        try:
            result = item.fn(self.engine)
        except Exception as exc:  # handed to the awaiting coroutine, which decides
            self._loop.call_soon_threadsafe(_set_exception, item.future, exc)
        else:
            self._loop.call_soon_threadsafe(_set_result, item.future, result)
        self._refresh()

    def _refresh(self) -> None:
        if self._snapshot_fn:
            self.snapshot = self._snapshot_fn(self.engine)
        self.published_cache = self.engine.published_cache()

    def _step(self) -> None:
        started, clock, cpu = time.time(), time.perf_counter(), time.thread_time()
        try:
            outputs = self.engine.step()
            ended = time.time()
            self._record(time.perf_counter() - clock, time.thread_time() - cpu)
            extra = self._after_step(self.engine, outputs) if self._after_step else None
            self._refresh()
        except Exception as exc:
            # A request's own failure never gets here: LLMEngine.step fails that request and goes
            # on. What does is a bug in the engine itself, or a broken device (EngineBroken: even a
            # one-token probe fails); the engine's state is then unknown: the service must exit and
            # its requests be reassigned, not go on serving from a half-updated batch.
            log.exception("engine step failed")
            self._loop.call_soon_threadsafe(_set_exception, self.failed, exc)
            self._fail_pending(exc)
            raise
        self._loop.call_soon_threadsafe(self._on_step, StepResult(outputs, started, ended, extra))

    def _record(self, wall_s: float, cpu_s: float) -> None:
        shape = self.engine.last_step
        if shape is not None:
            self.steps.record(shape.kind, shape.num_seqs, shape.num_tokens, wall_s, cpu_s)

    def _fail_pending(self, exc: Exception) -> None:
        """After a failed step: every call queued, and any made later, raises instead of waiting."""
        with self._dead_lock:
            self._dead = True
            pending = []
            while not self._calls.empty():
                pending.append(self._calls.get_nowait())
        error = RuntimeError(f"the engine failed: {exc!r}")
        for item in pending:
            if item is not None:
                self._loop.call_soon_threadsafe(_set_exception, item.future, error)


async def load_engine(config: EngineConfig) -> LLMEngine:
    """Build the engine on a thread of its own, which has exited when this returns.

    torch's OpenMP runtime (libgomp) gives every thread that runs a parallel region a team of worker
    threads, kept for as long as that thread lives. Loading packs the weights in parallel regions, so
    a loading thread that stayed alive (the event loop's, or asyncio.to_thread's) would keep a second
    team beside the engine thread's. libgomp then manages more threads than there are cores and
    stops spinning between parallel regions: every region of every step waits on futex wake-ups.
    Measured with two threads on two cores: decode steps 1.5-2x slower (docs/benchmarks.md,
    "In-worker step time"). The only team left is the engine thread's.
    """
    built: list[LLMEngine] = []
    failed: list[BaseException] = []

    def build() -> None:
        try:
            built.append(LLMEngine(config))
        except BaseException as exc:  # raised in the caller
            failed.append(exc)

    thread = threading.Thread(target=build, name="engine-load", daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join)  # join() runs no torch: that pool thread starts no team
    if failed:
        raise failed[0]
    return built[0]


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
