"""How long the engine's steps take inside a worker, by kind and batch size (pure, no I/O).

The engine thread records every step's wall time and its own CPU time. Their ratio tells a step the
machine slowed down (the thread was runnable but another thread held its core: CPU time below wall
time) from one that ran slower on the core it had (CPU time equal to wall time). Workers send the
histograms with each heartbeat; the gateway's /metrics exports them as
``splitserve:engine_step_seconds`` per worker, to read against ``splitserve bench engine`` at the
same batch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from splitserve.v1 import common_pb2 as pb

# Upper bounds in seconds; a last, open bucket takes the rest.
STEP_BUCKETS = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08,
                0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
# The smallest batch of each batch class: 1, 2, 3-4, 5-8, ..., 129 and more.
BATCH_CLASSES = (1, 2, 3, 5, 9, 17, 33, 65, 129)
KINDS = {"prefill": pb.STEP_KIND_PREFILL, "decode": pb.STEP_KIND_DECODE, "mixed": pb.STEP_KIND_MIXED,
         "prefill_slice": pb.STEP_KIND_PREFILL_SLICE}
KIND_NAMES = {v: k for k, v in KINDS.items()}


def batch_class(num_seqs: int) -> int:
    """The smallest batch of num_seqs's class."""
    return BATCH_CLASSES[max(0, bisect.bisect_right(BATCH_CLASSES, num_seqs) - 1)]


def batch_label(batch_min: int) -> str:
    """'1', '2', '3-4', ..., '129+': a batch class as a metric label."""
    i = BATCH_CLASSES.index(batch_min)
    if i + 1 == len(BATCH_CLASSES):
        return f"{batch_min}+"
    top = BATCH_CLASSES[i + 1] - 1
    return str(batch_min) if top == batch_min else f"{batch_min}-{top}"


@dataclass
class _Series:
    counts: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))
    wall_s: float = 0.0
    cpu_s: float = 0.0
    tokens: int = 0


class StepStats:
    """Step histograms per (kind, batch class). Written by the engine thread only; to_proto() may be
    called from another thread: it reads plain ints and floats, and a step recorded meanwhile is in
    the next heartbeat."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, int], _Series] = {}

    def record(self, kind: str, num_seqs: int, num_tokens: int, wall_s: float, cpu_s: float) -> None:
        series = self._series.setdefault((kind, batch_class(num_seqs)), _Series())
        series.counts[bisect.bisect_left(STEP_BUCKETS, wall_s)] += 1
        series.wall_s += wall_s
        series.cpu_s += cpu_s
        series.tokens += num_tokens

    def to_proto(self) -> list[pb.StepHistogram]:
        return [pb.StepHistogram(kind=KINDS[kind], batch_min=batch_min, counts=list(s.counts),
                                 wall_s=s.wall_s, cpu_s=s.cpu_s, num_tokens=s.tokens)
                for (kind, batch_min), s in sorted(list(self._series.items()))]


def check_step_histograms(steps) -> None:
    """ValueError unless steps (from a peer) is what StepStats.to_proto() could have made."""
    if len(steps) > len(KINDS) * len(BATCH_CLASSES):
        raise ValueError(f"{len(steps)} step histograms; there are at most {len(KINDS) * len(BATCH_CLASSES)}")
    seen = set()
    for h in steps:
        key = (h.kind, h.batch_min)
        if h.kind not in KIND_NAMES or h.batch_min not in BATCH_CLASSES or key in seen:
            raise ValueError(f"a step histogram for kind {h.kind}, batch {h.batch_min}: unknown or repeated")
        seen.add(key)
        if len(h.counts) != len(STEP_BUCKETS) + 1 or min(h.counts) < 0:
            raise ValueError(f"a step histogram has {len(h.counts)} counts; it needs "
                             f"{len(STEP_BUCKETS) + 1}, none negative")
        if not (0 <= h.wall_s < float("inf") and 0 <= h.cpu_s < float("inf")) or h.num_tokens < 0:
            raise ValueError("a step histogram's sums must be finite and not negative")
