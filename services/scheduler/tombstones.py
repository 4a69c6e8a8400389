"""The scheduler's memory of early cancels: bounded in size and time."""

from __future__ import annotations

import time
from collections import OrderedDict


class Tombstones:
    """Ids of requests cancelled before the scheduler read them (the cancel stream and the request
    stream are read apart), remembered for ttl_s so the request is dropped when it comes.

    Kept in insertion order, so adding costs O(1) amortized: expired ids leave from the front. A
    flood of cancels for unknown ids keeps at most max_size ids, oldest dropped first.
    """

    def __init__(self, ttl_s: float = 300.0, max_size: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._ids: OrderedDict[str, float] = OrderedDict()  # oldest first

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids.pop(request_id, None)  # a repeat moves to the back, with its new time
        self._ids[request_id] = now
        while len(self._ids) > self.max_size or self._oldest_expired(now):
            self._ids.popitem(last=False)

    def _oldest_expired(self, now: float) -> bool:
        oldest = next(iter(self._ids.values()), None)
        return oldest is not None and now - oldest >= self.ttl_s

    def __contains__(self, request_id: str) -> bool:
        added = self._ids.get(request_id)
        return added is not None and time.monotonic() - added < self.ttl_s

    def __len__(self) -> int:
        return len(self._ids)
