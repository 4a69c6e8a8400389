"""What the cluster is being asked to do right now: a sliding-window estimate of the arrival rate and of
prompt and output lengths, which the planner needs to tell whether the running placement still fits.

Pure: the caller passes the time (the scheduler's monotonic clock), so tests need no sleeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from splitserve.v1 import scheduler_pb2 as spb

DEFAULT_WINDOW_S = 120.0


@dataclass(frozen=True)
class LengthStats:
    count: int
    mean: float
    p50: float
    p90: float

    @staticmethod
    def of(values: list[int]) -> LengthStats:
        if not values:
            return LengthStats(0, 0.0, 0.0, 0.0)
        ordered = sorted(values)
        return LengthStats(len(ordered), sum(ordered) / len(ordered), _quantile(ordered, 0.5),
                           _quantile(ordered, 0.9))


def _quantile(ordered: list[int], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), on a sorted list."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class WorkloadEstimator:
    """Arrivals (with prompt lengths) and finished requests (with output lengths) over the last
    window_s seconds."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, max_tokens)
        self._finished: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, output tokens)
        self._since: float | None = None  # the first arrival seen: a young window is shorter

    def arrived(self, now: float, prompt_len: int, max_tokens: int = 0) -> None:
        if self._since is None:
            self._since = now
        self._arrivals.append((now, prompt_len, max_tokens))
        self._trim(now)

    def finished(self, now: float, output_len: int, prompt_len: int = 0) -> None:
        self._finished.append((now, prompt_len, output_len))
        self._trim(now)

    def samples(self, now: float, min_finished: int = 10) -> list[tuple[int, int]]:
        """(prompt, output) length pairs of the window, for a planner to resample: the finished
        requests', or with fewer than min_finished of those, the arrivals' with their max_tokens."""
        self._trim(now)
        if len(self._finished) >= min_finished:
            return [(n_in, n_out) for _, n_in, n_out in self._finished]
        return [(n_in, n_max) for _, n_in, n_max in self._arrivals if n_max > 0]

    def estimate(self, now: float) -> spb.WorkloadEstimate:
        self._trim(now)
        prompts = LengthStats.of([n for _, n, _ in self._arrivals])
        outputs = LengthStats.of([n for _, _, n in self._finished])
        age = now - self._since if self._since is not None else 0.0
        if age >= self.window_s:
            observed, rate = self.window_s, prompts.count / self.window_s
        else:  # a young window began with the first arrival, so that one is not counted
            observed, rate = age, (prompts.count - 1) / age if age > 0 else 0.0
        return spb.WorkloadEstimate(
            window_s=observed, arrival_rate=rate, num_arrivals=prompts.count,
            prompt_len_mean=prompts.mean, prompt_len_p50=prompts.p50, prompt_len_p90=prompts.p90,
            num_finished=outputs.count, output_len_mean=outputs.mean, output_len_p50=outputs.p50,
            output_len_p90=outputs.p90)

    def _trim(self, now: float) -> None:
        for samples in (self._arrivals, self._finished):
            while samples and samples[0][0] < now - self.window_s:
                samples.popleft()
