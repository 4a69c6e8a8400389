"""Riding out a Redis outage (a restart, a short network cut): retry until Redis is back.

redis-py reconnects by itself on the next command once the server answers again; what it does not
do is wait for the server. Its own
`Retry` is switched off in `connect()` (it retries any command blindly a fixed number of times, an
XADD whose reply was lost included), and the wrappers in `streams.py` retry here instead, each as
its command allows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

log = structlog.get_logger(__name__)
R = TypeVar("R")

# BusyLoadingError (Redis answering LOADING while it replays its AOF) is a ConnectionError.
RETRYABLE = (ConnectionError, TimeoutError)
FIRST_RETRY_DELAY_S = 0.1
MAX_RETRY_DELAY_S = 2.0


class RedisLink:
    """Redis as one process sees it through one client: up, or down since when.

    Every wrapper on the client shares it, so an outage is logged once however many tasks notice
    it, and a reader knows that an outage happened (`num_outages`) even when another task noticed.
    `call` retries an operation while Redis is unreachable, waiting 0.1 s doubling to 2 s between
    tries. The first failure of an outage logs "redis unreachable, retrying", the first success
    after it "redis reconnected" with how long Redis was gone.
    """

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.num_outages = 0  # outages over so far
        self._backoff = ExponentialBackoff(cap=MAX_RETRY_DELAY_S, base=FIRST_RETRY_DELAY_S)

    @property
    def up(self) -> bool:
        return self.down_since is None

    async def call(self, operation: Callable[[], Awaitable[R]], limit_s: float | None = None) -> R:
        """operation(), tried again while Redis is unreachable; after limit_s seconds of trying
        (None: no limit) the last error is raised."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                result = await operation()
                break
            except RETRYABLE as exc:
                self.lost(exc)
                if limit_s is not None and time.monotonic() - started >= limit_s:
                    log.error("redis still unreachable, giving up", after_s=round(limit_s, 1))
                    raise
                await asyncio.sleep(self._backoff.compute(attempt))
                attempt += 1
        self.restored()
        return result

    def lost(self, error: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("redis unreachable, retrying", error=str(error) or repr(error))

    def restored(self) -> None:
        if self.down_since is not None:
            down_s = time.monotonic() - self.down_since
            self.down_since, self.num_outages = None, self.num_outages + 1
            log.info("redis reconnected", down_s=round(down_s, 2))
