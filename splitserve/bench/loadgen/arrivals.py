"""Open-loop arrival times: Poisson, or gamma inter-arrival times for burstier traffic.

As in vLLM's benchmark_serving: gaps are Gamma(shape=B, scale=1/(rate*B)), so the mean rate is
`rate` for every burstiness B; B=1 is a Poisson process, B<1 burstier, B>1 more regular. The first
request goes at t=0. Pure Python and seeded, so a simulator can replay the same arrivals.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ArrivalProcess:
    rate: float  # mean requests per second; math.inf sends every request at t=0
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")

    def times(self, seed: int) -> Iterator[float]:
        """Endless arrival times in seconds from the start: 0, then cumulative gamma gaps."""
        rng = random.Random(f"arrivals:{seed}")
        t = 0.0
        while True:
            yield t
            if math.isfinite(self.rate):
                t += rng.gammavariate(self.burstiness, 1.0 / (self.rate * self.burstiness))


def arrival_times(process: ArrivalProcess, seed: int, *, num_requests: int | None = None,
                  duration_s: float | None = None) -> list[float]:
    """The first num_requests arrivals, or every arrival before duration_s (give exactly one)."""
    if (num_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of num_requests and duration_s")
    if duration_s is not None and not math.isfinite(process.rate):
        raise ValueError("an infinite rate needs a number of requests, not a duration")
    times = []
    for t in process.times(seed):
        if len(times) == num_requests or (duration_s is not None and t >= duration_s):
            return times
        times.append(t)
    raise AssertionError("unreachable: times() is endless")
