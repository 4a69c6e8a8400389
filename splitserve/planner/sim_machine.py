"""The machine the simulated workers share: how much slower a step runs because of the others.

A step that starts while other workers are stepping runs slower by the profile's Contention (the
cores share the memory system), scaled by the share of the other cores that are busy and by what
they run. The gateway, the scheduler, Redis and the load generator do CPU work for every request
admitted, every step that emits tokens and every output token (the profile's `aux_cpu_per_request`,
`aux_cpu_per_step` and `aux_cpu_per_token`); an idle core absorbs it, and what no idle core can take
comes out of the cores that are stepping, in equal shares. Both are priced when a step starts, from
who is stepping then and the rates of the last second.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from splitserve.planner.events import EventLoop
from splitserve.planner.latency import Overheads

if TYPE_CHECKING:
    from splitserve.planner.sim_engine import SimEngine

RATE_WINDOW_S = 1.0
MAX_STOLEN = 0.5  # no more than half a busy core goes to the shared services


class Machine:
    def __init__(self, loop: EventLoop, num_cores: int, overheads: Overheads) -> None:
        self.loop, self.num_cores = loop, num_cores
        self.overheads = overheads
        self.stepping: dict[SimEngine, str] = {}  # engine -> the kind of step it runs: prefill or decode
        # (time, requests, steps, tokens) of the last RATE_WINDOW_S: admissions and token-emitting steps
        self._events: deque[tuple[float, int, int, int]] = deque()
        self._recent = [0, 0, 0]
        # over the whole run: what calibrate.py prices the per-request and per-step CPU on
        self.num_admitted = self.num_emitting_steps = 0

    def start(self, engine: SimEngine, kind: str, seconds: float) -> float:
        """A step of `kind` starts on `engine`: the time it takes on this machine now."""
        seconds *= self.slowdown(engine, kind)
        self.stepping[engine] = kind
        return seconds

    def end(self, engine: SimEngine, num_tokens: int) -> None:
        del self.stepping[engine]
        if num_tokens:
            self.num_emitting_steps += 1
            self._count(0, 1, num_tokens)

    def admit(self) -> None:
        """The gateway admitted a request."""
        self.num_admitted += 1
        self._count(1, 0, 0)

    def _count(self, requests: int, steps: int, tokens: int) -> None:
        self._events.append((self.loop.now, requests, steps, tokens))
        for i, n in enumerate((requests, steps, tokens)):
            self._recent[i] += n

    def slowdown(self, engine: SimEngine, kind: str) -> float:
        degree = engine.spec.degree
        others = [(e.spec.degree.degree, k) for e, k in self.stepping.items() if e is not engine]
        other_cores = self.num_cores - degree.degree
        corun = 0.0
        if other_cores > 0:
            corun = sum(n * degree.contention.slowdown(kind, k) for n, k in others) / other_cores
        busy = degree.degree + sum(n for n, _ in others)
        demand = self.aux_demand()  # cores' worth of shared-service work
        stolen = min(MAX_STOLEN, max(0.0, demand - max(0, self.num_cores - busy)) / busy)
        return (1.0 + corun) / (1.0 - stolen)

    def aux_demand(self) -> float:
        """Cores the shared services need at the rates of the last RATE_WINDOW_S."""
        horizon = self.loop.now - RATE_WINDOW_S
        while self._events and self._events[0][0] < horizon:
            for i, n in enumerate(self._events.popleft()[1:]):
                self._recent[i] -= n
        requests, steps, tokens = self._recent
        o = self.overheads
        return (o.aux_cpu_per_request * requests + o.aux_cpu_per_step * steps
                + o.aux_cpu_per_token * tokens) / RATE_WINDOW_S
