"""The highest request rate that still meets an SLO attainment target: a bracket, then bisection.

Pure arithmetic around a function `attainment(rate) -> fraction`, which the planner backs with the
simulator. Attainment falls as the rate grows, but not strictly: a finite run at one seed can pass
at a rate just above one that fails. The search therefore promises what it checked, no more: the
rate it returns met the target, the rate `first_failing` (at most `rel_tol` above it) did not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

MIN_RATE = 1e-3  # req/s: below this a placement counts as serving nothing
MAX_RATE = 1e5  # req/s: above this the search stops growing and reports a lower bound
FIRST_STEP = 1.1  # the first step out of a neighbour's bracket that no longer holds


@dataclass(frozen=True)
class RateSearch:
    """What the search found. max_rate is None when even MIN_RATE failed; first_failing is None
    when even MAX_RATE passed (max_rate is then only a lower bound)."""

    max_rate: float | None
    first_failing: float | None
    attainment: float | None  # at max_rate
    num_simulations: int

    @property
    def bracket(self) -> tuple[float, float] | None:
        """(passing, failing) rates, to start a neighbour's search from."""
        if self.max_rate is None or self.first_failing is None:
            return None
        return self.max_rate, self.first_failing


class _Probe:
    """attainment(rate), each rate evaluated once."""

    def __init__(self, attainment: Callable[[float], float], target: float) -> None:
        self.attainment, self.target = attainment, target
        self.seen: dict[float, float] = {}

    def passes(self, rate: float) -> bool:
        if rate not in self.seen:
            self.seen[rate] = self.attainment(rate)
        return self.seen[rate] >= self.target


def max_rate(attainment: Callable[[float], float], target: float, guess: float,
             bracket: tuple[float, float] | None = None, rel_tol: float = 0.02) -> RateSearch:
    """The highest rate whose attainment is >= target, to within rel_tol (first_failing / max_rate
    <= 1 + rel_tol). Starts from bracket (a neighbour's answer: two simulations when it holds) or
    from guess, grows or shrinks geometrically until a passing and a failing rate are found, then
    bisects between them in log space."""
    probe = _Probe(attainment, target)
    low, high = _bracket(probe, bracket or (guess, guess))
    while low is not None and high is not None and high / low > 1 + rel_tol:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if probe.passes(mid) else (low, mid)
    return RateSearch(low, high, probe.seen.get(low) if low is not None else None, len(probe.seen))


def _bracket(probe: _Probe, start: tuple[float, float]) -> tuple[float | None, float | None]:
    """A passing rate and a failing one above it (either None at the limits). From start, steps
    grow geometrically: from a neighbour's bracket they begin at 10%, from a guess at 2x."""
    low, high = (min(max(rate, MIN_RATE), MAX_RATE) for rate in start)
    factor = max(high / low, FIRST_STEP) if high > low else 2.0
    if not probe.passes(low):
        high = low
        while low > MIN_RATE:  # shrink until one passes
            low = max(high / factor, MIN_RATE)
            if probe.passes(low):
                return low, high
            high, factor = low, factor * factor
        return None, low
    while high == low or probe.passes(high):  # grow until one fails
        if high >= MAX_RATE:
            return high, None
        low, high = high, min(high * factor, MAX_RATE)
        factor *= factor
    return low, high
