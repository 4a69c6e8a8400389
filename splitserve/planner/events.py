"""The discrete-event loop of the simulator: a heap of (time, order, callback)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class EventLoop:
    """Runs callbacks in time order; callbacks at the same time run in the order they were scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._order = itertools.count()

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._order), fn, args))

    def after(self, delay_s: float, fn: Callable, *args) -> None:
        self.at(self.now + delay_s, fn, *args)

    def run(self) -> None:
        heap = self._heap
        while heap:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)
