"""Running a service process until SIGINT/SIGTERM or a fatal error, then shutting down in order."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine

import structlog

log = structlog.get_logger(__name__)


async def run_until_signal(tasks: list[Coroutine], shutdown: Callable[[], Awaitable[None]],
                           failed: asyncio.Future | None = None) -> int:
    """Run background tasks until a signal (exit 0) or until one of them, or `failed`, fails (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = [asyncio.create_task(t) for t in tasks]
    watched = [*running, asyncio.create_task(stop.wait()), *([failed] if failed else [])]
    done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    code = 0 if stop.is_set() else 1
    for task in done:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("fatal error, shutting down", error=repr(task.exception()))
            code = 1
    log.info("shutting down", exit_code=code)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    await shutdown()
    return code
