"""Running a service process: background tasks, and serving until SIGINT/SIGTERM or a fatal error."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine

import structlog

from splitserve.common.logging import describe

log = structlog.get_logger(__name__)


class Background:
    """Fire-and-forget tasks that are neither lost nor silent.

    The event loop keeps only weak references to tasks, so an unreferenced task can vanish
    mid-flight; this set holds them until they end, and an exception one raises is logged.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine | Awaitable) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", error=describe(task.exception()))

    async def wait(self) -> None:
        """Until every task spawned so far, and any they spawn meanwhile, has ended."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class Progress:
    """An event a service sets whenever its work shrinks (a request finished, freed, handed back),
    so that a drain can wait for a condition without polling."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def note(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until condition() holds, re-checking it at every note(); False if timeout_s ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not condition():
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)
        return True


async def run_until_signal(tasks: list[Awaitable], shutdown: Callable[[], Awaitable[None]],
                           failed: asyncio.Future | None = None) -> int:
    """Run background tasks until a signal (exit 0) or until one of them, or `failed`, ends (exit 1).

    `shutdown` runs while the tasks still run (a gateway drains through its reply router, a worker
    publishes its last tokens); they are cancelled after it.
    """
    freeze_startup_heap()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A coroutine's task is named after it ("SchedulerServer.lead_forever"), for the fatal line.
    running = [asyncio.create_task(t, name=t.__qualname__) if asyncio.iscoroutine(t)
               else asyncio.ensure_future(t) for t in tasks]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*running, stopper, *([failed] if failed else [])],
                                 return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    code = 0 if stop.is_set() else 1
    for task in done - {stopper}:
        exc = None if task.cancelled() else task.exception()
        error = "cancelled" if task.cancelled() else "returned" if exc is None else describe(exc)
        log.error("fatal: a background task ended", task=_name(task), error=error)
        code = 1
    log.info("shutting down", exit_code=code)
    try:
        await shutdown()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    return code


def freeze_startup_heap() -> None:
    """Take what the service built to start (modules, the model's Python objects, the tokenizer, the
    protobuf descriptors: ~360k objects in a worker) out of the garbage collector's reach, as vLLM and
    SGLang do once started. Every full collection scanned them all, 0.18 s with the GIL held (a stall
    of the engine thread and the event loop alike), and the interpreter's exit collected them again,
    ~0.8 s of every service's stop. Frozen objects freed later still go by their reference counts,
    but one left in a reference cycle is never collected: what a service builds before it serves must
    live as long as the process (the engine, the model, the tokenizer, the channels all do)."""
    gc.collect()
    gc.freeze()
    log.info("startup heap frozen", objects=gc.get_freeze_count())


def _name(task: asyncio.Future) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else "engine"
