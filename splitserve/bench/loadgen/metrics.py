"""The report of one run: a pure function of its request records (see records.py for definitions).

Latency figures are in milliseconds; percentiles interpolate linearly between order statistics
(numpy's default). SLO attainment counts over every request sent, so a failed request is a miss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from splitserve.bench.loadgen.records import RequestRecord


@dataclass(frozen=True)
class Slo:
    """DistServe-style targets, in seconds; None means that target is not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    target: float = 0.9  # the attainment a rate must reach to count as served

    @property
    def given(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None

    def ttft_met(self, r: RequestRecord) -> bool:
        return r.ok and (self.ttft_s is None or r.ttft_s <= self.ttft_s)

    def tpot_met(self, r: RequestRecord) -> bool:
        """A single-token request has no TPOT and meets the TPOT target."""
        return r.ok and (self.tpot_s is None or r.tpot_s is None or r.tpot_s <= self.tpot_s)


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of_seconds(cls, values_s: list[float]) -> LatencyStats:
        ms = sorted(v * 1e3 for v in values_s)
        if not ms:
            return cls(0, None, None, None, None)
        return cls(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99))


@dataclass(frozen=True)
class SloReport:
    ttft_s: float | None
    tpot_s: float | None
    target: float
    attainment: float  # fraction of all requests meeting both targets
    ttft_attainment: float
    tpot_attainment: float
    goodput_rps: float  # requests meeting both targets per second of the run
    meets_target: bool


@dataclass(frozen=True)
class Report:
    num_requests: int
    completed: int
    failed: int
    duration_s: float  # first send to the last stream's end
    request_throughput: float  # completed requests per second
    input_token_throughput: float  # prompt tokens of completed requests per second
    output_token_throughput: float
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo: SloReport | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile of ascending values, interpolating linearly (numpy's 'linear')."""
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def duration_s(records: list[RequestRecord]) -> float:
    sends = [r.send_s for r in records if r.send_s is not None]
    ends = [r.end_s for r in records if r.end_s is not None]
    return max(ends) - min(sends) if sends and ends else 0.0


def _per_second(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def slo_report(records: list[RequestRecord], slo: Slo, seconds: float) -> SloReport:
    n = max(1, len(records))
    num_good = sum(slo.ttft_met(r) and slo.tpot_met(r) for r in records)
    attainment = num_good / n
    return SloReport(slo.ttft_s, slo.tpot_s, slo.target, attainment,
                     sum(map(slo.ttft_met, records)) / n, sum(map(slo.tpot_met, records)) / n,
                     _per_second(num_good, seconds), attainment >= slo.target)


def summarize(records: list[RequestRecord], slo: Slo | None = None) -> Report:
    done = [r for r in records if r.ok]
    seconds = duration_s(records)
    return Report(
        num_requests=len(records), completed=len(done), failed=len(records) - len(done),
        duration_s=seconds,
        request_throughput=_per_second(len(done), seconds),
        input_token_throughput=_per_second(sum(r.num_prompt_tokens for r in done), seconds),
        output_token_throughput=_per_second(sum(r.num_output_tokens for r in done), seconds),
        ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in done]),
        tpot_ms=LatencyStats.of_seconds([r.tpot_s for r in done if r.tpot_s is not None]),
        itl_ms=LatencyStats.of_seconds([gap for r in done for gap in r.itls_s]),
        e2e_ms=LatencyStats.of_seconds([r.e2e_s for r in done]),
        slo=slo_report(records, slo, seconds) if slo is not None and slo.given else None,
    )


def format_report(report: Report, title: str) -> str:
    """A readable summary, in the spirit of vLLM's benchmark_serving printout."""
    lines = [f"==== {title} ====",
             f"requests: {report.completed} completed, {report.failed} failed of {report.num_requests}",
             f"duration: {report.duration_s:.2f} s",
             (f"throughput: {report.request_throughput:.3f} req/s, {report.input_token_throughput:.1f} input "
              f"tok/s, {report.output_token_throughput:.1f} output tok/s")]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s: LatencyStats = getattr(report, name)
        figures = ", ".join(f"{k} {_ms(getattr(s, k))}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name[:-3].upper():>4} ms: {figures}")
    if report.slo is not None:
        s = report.slo
        lines.append(f"SLO (TTFT <= {s.ttft_s} s, TPOT <= {s.tpot_s} s): attainment {s.attainment:.1%} "
                     f"(TTFT {s.ttft_attainment:.1%}, TPOT {s.tpot_attainment:.1%}), goodput "
                     f"{s.goodput_rps:.3f} req/s, target {s.target:.0%} "
                     f"{'met' if s.meets_target else 'missed'}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
