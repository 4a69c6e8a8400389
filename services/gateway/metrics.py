"""Prometheus metrics with vLLM's names under the splitserve: prefix, in the gateway's own registry."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from splitserve.common.step_stats import KIND_NAMES, STEP_BUCKETS, batch_label

from splitserve.services.scheduler.registry import ROLE_NAMES
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb

from .schema import Finish

# vLLM's buckets, so dashboards built for vLLM read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = tuple(float(4**i) for i in range(5, 19))  # 1 KiB .. 64 GiB


class GatewayMetrics:
    """Latency histograms from what the gateway sees and the final Timeline; load gauges from the
    scheduler's cluster state; token and request counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._histograms()
        self._gauges()
        self._counters()
        self.steps = StepCollector()
        self.registry.register(self.steps)

    def _histograms(self) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"splitserve:{name}", doc, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token, as the gateway "
                              "sees it.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive token "
                             "messages the gateway receives.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time from the request stream to "
                                    "the start of its prefill batch.", REQUEST_BUCKETS)
        self.kv_transfer_time = histogram("kv_transfer_time_seconds", "KV cache pull from prefill "
                                          "to decode.", TRANSFER_BUCKETS)
        self.kv_transfer_bytes = histogram("kv_transfer_bytes", "Bytes of KV cache pulled per "
                                           "request.", BYTES_BUCKETS)

    def _gauges(self) -> None:
        self.num_running = Gauge("splitserve:num_requests_running", "Requests assigned to workers "
                                 "and not finished (scheduler).", registry=self.registry)
        self.num_waiting = Gauge("splitserve:num_requests_waiting", "Requests waiting at the "
                                 "scheduler or in a worker's queue.", registry=self.registry)
        self.kv_usage = Gauge("splitserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use, "
                              "per worker role (1 = full).", ["role"], registry=self.registry)
        self.arrival_rate = Gauge("splitserve:workload_arrival_rate", "Requests per second arriving "
                                  "at the scheduler, over its workload window.", registry=self.registry)
        self.prompt_len = Gauge("splitserve:workload_prompt_tokens", "Prompt lengths of recent "
                                "arrivals (scheduler's window), by statistic.", ["stat"], registry=self.registry)
        self.output_len = Gauge("splitserve:workload_output_tokens", "Output lengths of recently "
                                "finished requests (scheduler's window), by statistic.", ["stat"],
                                registry=self.registry)
        self.placement_workers = Gauge("splitserve:placement_workers", "Workers per role in the running "
                                       "placement and in the planner's recommendation.",
                                       ["placement", "role"], registry=self.registry)
        self.placement_goodput = Gauge("splitserve:placement_goodput", "Simulated goodput (req/s within "
                                       "the SLOs) of the running and the recommended placement, for the "
                                       "workload of late.", ["placement"], registry=self.registry)
        self.placement_change = Gauge("splitserve:placement_change_recommended", "1 when the planner "
                                      "recommends switching placement.", registry=self.registry)
        self.num_draining = Gauge("splitserve:num_workers_draining", "Workers shutting down: they "
                                  "finish what they hold and take nothing new.", registry=self.registry)
        self.num_pending = Gauge("splitserve:gateway_requests_in_flight", "Requests this gateway "
                                 "is serving (bounded by --max-pending).", registry=self.registry)

    def _counters(self) -> None:
        self.prompt_tokens = Counter("splitserve:prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=self.registry)
        self.generation_tokens = Counter("splitserve:generation_tokens", "Generated tokens "
                                         "delivered to clients.", registry=self.registry)
        self.request_success = Counter("splitserve:request_success", "Requests finished, by "
                                       "finish reason.", ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_finished(self, finish: Finish, num_prompt_tokens: int, num_output_tokens: int,
                         e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.request_success.labels(finished_reason=finish.value).inc()

    def observe_timeline(self, timeline: pb.Timeline) -> None:
        """Queue and KV transfer figures of a finished request's lifecycle record."""
        if timeline.queued and timeline.prefill_start:
            self.queue_time.observe(max(0.0, timeline.prefill_start - timeline.queued))
        if timeline.kv_transfer_start and timeline.kv_transfer_end:
            self.kv_transfer_time.observe(max(0.0, timeline.kv_transfer_end - timeline.kv_transfer_start))
        if timeline.kv_transfer_bytes:
            self.kv_transfer_bytes.observe(timeline.kv_transfer_bytes)

    def update_cluster(self, state: spb.ClusterState) -> None:
        self.steps.workers = list(state.workers)
        self.num_running.set(state.num_running)
        self.num_waiting.set(state.num_waiting + sum(w.stats.num_waiting for w in state.workers))
        for role, name in ROLE_NAMES.items():
            self.kv_usage.labels(role=name).set(kv_usage([w for w in state.workers if w.worker.role == role]))
        self.num_draining.set(sum(w.draining for w in state.workers))
        recommendation = state.recommendation
        if recommendation.available:
            for which in ("running", "recommended"):
                placement = getattr(recommendation, which)
                for role in ("prefill", "decode", "colocated"):
                    self.placement_workers.labels(placement=which, role=role).set(getattr(placement, f"num_{role}"))
                self.placement_goodput.labels(placement=which).set(getattr(recommendation, f"{which}_goodput"))
            self.placement_change.set(int(recommendation.change))
        workload = state.workload
        self.arrival_rate.set(workload.arrival_rate)
        for stat in ("mean", "p50", "p90"):
            self.prompt_len.labels(stat=stat).set(getattr(workload, f"prompt_len_{stat}"))
            self.output_len.labels(stat=stat).set(getattr(workload, f"output_len_{stat}"))


class StepCollector:
    """The engine step histograms each worker sent with its latest heartbeat (the scheduler checked
    them), as cumulative Prometheus series per worker, kind and batch class, and each worker's
    prefix cache counters."""

    def __init__(self) -> None:
        self.workers: list[spb.WorkerState] = []

    def collect(self):
        wall = HistogramMetricFamily("splitserve:engine_step_seconds", "Wall time of the engine's steps "
                                     "inside each worker, by kind and batch size.",
                                     labels=["worker", "role", "kind", "batch"])
        cpu = CounterMetricFamily("splitserve:engine_step_cpu_seconds", "The engine thread's CPU time over "
                                  "those steps; below their wall time when the thread waited for a core, "
                                  "the GIL or its OpenMP team.", labels=["worker", "role", "kind", "batch"])
        tokens = CounterMetricFamily("splitserve:engine_step_tokens", "Tokens those steps computed.",
                                     labels=["worker", "role", "kind", "batch"])
        queries = CounterMetricFamily("splitserve:prefix_cache_queries", "Prompt tokens each worker looked "
                                      "up in its prefix cache (vLLM's counter).", labels=["worker", "role"])
        hits = CounterMetricFamily("splitserve:prefix_cache_hits", "Of those, the tokens found cached: their "
                                   "KV was reused, not computed.", labels=["worker", "role"])
        for w in self.workers:
            worker = [w.worker.instance_id, ROLE_NAMES.get(w.worker.role, "unknown")]
            queries.add_metric(worker, w.stats.prefix_cache_queries)
            hits.add_metric(worker, w.stats.prefix_cache_hits)
            for h in w.stats.steps:
                labels = [w.worker.instance_id, ROLE_NAMES.get(w.worker.role, "unknown"), KIND_NAMES[h.kind],
                          batch_label(h.batch_min)]
                cumulative, buckets = 0, []
                for bound, count in zip([*map(str, STEP_BUCKETS), "+Inf"], h.counts):
                    cumulative += count
                    buckets.append((bound, cumulative))
                wall.add_metric(labels, buckets, sum_value=h.wall_s)
                cpu.add_metric(labels, h.cpu_s)
                tokens.add_metric(labels, h.num_tokens)
        yield from (wall, cpu, tokens, queries, hits)


def kv_usage(workers: Iterable[spb.WorkerState]) -> float:
    """1 - free/total blocks over the workers; 0 when they report no blocks."""
    total = free = 0
    for w in workers:
        total += w.stats.num_blocks
        free += w.stats.num_free_blocks
    return 1.0 - free / total if total else 0.0
