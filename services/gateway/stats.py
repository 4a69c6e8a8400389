"""One request's latencies as the gateway sees them, and its final Timeline: they feed the Prometheus
metrics and the one log line per finished request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog

from splitserve.v1 import common_pb2 as pb

from .metrics import GatewayMetrics
from .schema import Finish, Output, Usage

log = structlog.get_logger(__name__)


@dataclass
class RequestStats:
    arrival: float  # wall clock (the Timeline's clock)
    started: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)  # monotonic, per message with new tokens
    timeline: pb.Timeline | None = None  # the cluster's record, from the last TokenEvent

    def on_output(self, output: Output, metrics: GatewayMetrics) -> None:
        """TTFT on the first tokens, inter-token latency on each later message (vLLM's ITL)."""
        now = time.monotonic()
        if output.token_ids:
            if self.token_times:
                metrics.itl.observe(now - self.token_times[-1])
            else:
                metrics.ttft.observe(now - self.started)
            self.token_times.append(now)
        if output.timeline is not None:
            self.timeline = output.timeline

    def record(self, request_id: str, finish: Finish | None, usage: Usage, metrics: GatewayMetrics) -> None:
        """Counters, histograms and the log line. finish None: the cluster failed the request."""
        e2e = time.monotonic() - self.started
        timeline = self.timeline or pb.Timeline()
        timeline.arrival = timeline.arrival or self.arrival
        if finish is not None:
            metrics.observe_finished(finish, usage.prompt_tokens, usage.completion_tokens, e2e)
        metrics.observe_timeline(timeline)
        log.info("request finished", request_id=request_id, finish_reason=finish.value if finish else "error",
                 prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                 completion_tokens=usage.completion_tokens, e2e_s=_round(e2e), **self._latencies(timeline))

    def _latencies(self, timeline: pb.Timeline) -> dict[str, float | None]:
        """TTFT, TPOT and KV transfer from the Timeline; the gateway's own clock where it lacks them."""
        ttft = _first(timeline_ttft(timeline), self._own_ttft())
        tpot = _first(timeline_tpot(timeline), self._own_tpot())
        transfer = (timeline.kv_transfer_end - timeline.kv_transfer_start
                    if timeline.kv_transfer_end and timeline.kv_transfer_start else None)
        return {"ttft_s": _round(ttft), "tpot_s": _round(tpot), "kv_transfer_s": _round(transfer),
                "kv_transfer_bytes": timeline.kv_transfer_bytes or None}

    def _own_ttft(self) -> float | None:
        return self.token_times[0] - self.started if self.token_times else None

    def _own_tpot(self) -> float | None:
        times = self.token_times
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def timeline_ttft(timeline: pb.Timeline) -> float | None:
    if not (timeline.first_token and timeline.arrival):
        return None
    return timeline.first_token - timeline.arrival


def timeline_tpot(timeline: pb.Timeline) -> float | None:
    """Mean time per token after the first (token_times has one entry per later token)."""
    if not (timeline.token_times and timeline.first_token):
        return None
    return (timeline.token_times[-1] - timeline.first_token) / len(timeline.token_times)


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
