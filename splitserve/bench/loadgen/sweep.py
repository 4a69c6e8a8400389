"""The goodput of a rate sweep, DistServe-style: the highest request rate the server sustains while
at least `target` of the requests meet both SLOs. Pure arithmetic on (rate, attainment) points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFINITION = (
    "Points are taken in increasing rate. F is the lowest rate whose SLO attainment is below the target "
    "and P the rate just below it (the last passing rate). goodput_rps = P + (a(P) - target) / "
    "(a(P) - a(F)) * (F - P): where the straight line between the two points crosses the target. If "
    "every rate passes, goodput_rps is the highest rate and is only a lower bound; if the lowest rate "
    "already fails, goodput_rps is null (below the lowest rate tried)."
)


@dataclass(frozen=True)
class SweepGoodput:
    goodput_rps: float | None
    target: float
    last_passing_rate: float | None
    first_failing_rate: float | None
    lower_bound_only: bool  # every rate passed: the true goodput may be higher
    definition: str = DEFINITION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sweep_goodput(points: list[tuple[float, float]], target: float) -> SweepGoodput:
    """points: (rate, attainment) pairs, in any order."""
    if not points:
        raise ValueError("a sweep needs at least one point")
    ordered = sorted(points)
    failing = [i for i, (_, attainment) in enumerate(ordered) if attainment < target]
    if not failing:
        return SweepGoodput(ordered[-1][0], target, ordered[-1][0], None, True)
    first = failing[0]
    fail_rate, fail_att = ordered[first]
    if first == 0:
        return SweepGoodput(None, target, None, fail_rate, False)
    pass_rate, pass_att = ordered[first - 1]
    goodput = pass_rate + (pass_att - target) / (pass_att - fail_att) * (fail_rate - pass_rate)
    return SweepGoodput(goodput, target, pass_rate, fail_rate, False)
