"""A discrete-event simulator of the cluster as built, from a latency profile.

It replays what `splitserve up` + `bench serve` do, request by request: the gateway's hops, the
scheduler's FCFS queue and placement (services/scheduler/registry.py: the prefill server with the
fewest outstanding prompt tokens among those with room, the decode server with the most free blocks
as of its last heartbeat), the prefill servers' token-budget batches and held KV blocks, the decode
servers' admission by free blocks, KV pulls, continuous batching and preemption, and the colocated
worker (prefill first, or chunked prefill). Engines step with the engine's own Scheduler and
BlockManager (sim_engine.py); step times come from the profile. The output is one RequestRecord per
request, as `bench serve` records them, so `summarize` gives the same report.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field, replace

from splitserve.bench.loadgen.arrivals import ArrivalProcess, arrival_times
from splitserve.bench.loadgen.config import ServeConfig
from splitserve.bench.loadgen.prompts import PromptFactory
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.workloads import Workload, sample_lengths
from splitserve.engine.block_manager import block_hashes, blocks_for
from splitserve.planner.events import EventLoop
from splitserve.planner.latency import Profile
from splitserve.planner.sim_engine import EngineSettings, EngineSpec, Role
from splitserve.planner.sim_machine import Machine
from splitserve.planner.sim_servers import ColocatedServer, DecodeServer, PrefillServer, Server

DEFAULT_CHUNK_SIZE = 256  # splitserve up --mode chunked (a test keeps them equal)
DEFAULT_PREFILL_SLICE_MS = 30.0  # splitserve up --mode layered (a test keeps them equal)


class Mode(enum.Enum):
    DISAGGREGATED = "disaggregated"
    COLOCATED = "colocated"  # a waiting prompt runs whole before the next decode step
    CHUNKED = "chunked"  # colocated with chunked prefill
    LAYERED = "layered"  # colocated with layered prefill: decode steps between slices of a prompt's layers


@dataclass(frozen=True)
class ClusterSpec:
    """What `splitserve up` would start, with the flags' defaults."""

    mode: Mode = Mode.DISAGGREGATED
    num_prefill: int = 1  # prefill servers (disaggregated) or colocated workers (the other modes)
    num_decode: int = 1  # decode servers (disaggregated only)
    prefill_degree: int = 1  # cores (or devices) of each prefill or colocated worker
    decode_degree: int = 1
    engine: EngineSettings = field(default_factory=EngineSettings)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # chunked mode only
    prefill_slice_ms: float = DEFAULT_PREFILL_SLICE_MS  # layered mode only
    prefill_queue_factor: float = 2.0  # the scheduler's --prefill-queue-factor
    heartbeat_interval_s: float = 1.0
    max_pending: int = 256  # the gateway's --max-pending (429 beyond)
    routing: str = "kv"  # the scheduler's --routing: "kv" or "least-loaded"
    route_request_tokens: int = 32  # the scheduler's --route-request-tokens

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or (self.mode is Mode.DISAGGREGATED and self.num_decode < 1):
            raise ValueError("a cluster needs at least one worker of each role")

    @property
    def num_cores(self) -> int:
        if self.mode is Mode.DISAGGREGATED:
            return self.num_prefill * self.prefill_degree + self.num_decode * self.decode_degree
        return self.num_prefill * self.prefill_degree

    def describe(self) -> str:
        if self.mode is Mode.DISAGGREGATED:
            return (f"{self.num_prefill} prefill x {self.prefill_degree} + "
                    f"{self.num_decode} decode x {self.decode_degree}")
        return f"{self.num_prefill} {self.mode.value} x {self.prefill_degree}"


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival_s: float
    input_len: int
    output_len: int
    # The chained hashes of the prompt's full blocks, for workloads whose prompts share prefixes
    # (system prompts, a trace's hash ids): the prefix cache and KV-aware routing then apply.
    block_hashes: tuple[bytes, ...] = field(default=(), repr=False)


def workload_requests(workload: Workload, rate: float, seed: int, *, burstiness: float = 1.0,
                      num_requests: int | None = None, duration_s: float | None = None) -> list[SimRequest]:
    """The arrivals and lengths `bench serve` sends for this workload, rate and seed."""
    times = arrival_times(ArrivalProcess(rate, burstiness), seed, num_requests=num_requests, duration_s=duration_s)
    lengths = sample_lengths(workload, len(times), seed)
    return [SimRequest(i, t, n_in, n_out) for i, (t, (n_in, n_out)) in enumerate(zip(times, lengths))]


def serve_requests(serve: ServeConfig, rate: float, block_size: int) -> list[SimRequest]:
    """What `bench serve` sends for this config at this rate: for workloads whose prompts share
    prefixes (--system-prompts, --trace) with their prompts' block hashes, built from the very
    prompts it would send; otherwise arrivals and lengths alone (no prompt shares a block)."""
    if serve.shared_prefix is None and serve.trace is None:
        return workload_requests(serve.workload, rate, serve.seed, burstiness=serve.burstiness,
                                 num_requests=serve.num_requests, duration_s=serve.duration_s)
    from splitserve.bench.loadgen.run import request_specs

    factory = PromptFactory(serve.seed, 0, serve.token_range, (), serve.shared_prefix)
    return [SimRequest(s.index, s.scheduled_s, s.input_len, s.output_len,
                       tuple(block_hashes(s.prompt, block_size))) for s in request_specs(serve, rate, factory)]


# -- placement: services/scheduler/registry.py (a test checks both agree) -------------------------


def pick_prefill(takers: list[Server], num_tokens: int, queue_factor: float) -> Server | None:
    """The least-loaded prefill (or colocated) worker with room for num_tokens more, or None."""
    fits = [w for w in takers if w.outstanding_tokens == 0
            or w.outstanding_tokens + num_tokens <= queue_factor * w.token_budget]
    return min(fits, key=lambda w: (w.outstanding_tokens, len(w.assigned)), default=None)


def route_prefill(takers: list[Server], request: SimRequest, queue_factor: float,
                  request_tokens: int) -> tuple[Server, int] | None:
    """KV-aware routing (registry.route_prefill): least queued + uncached tokens + request_tokens per
    assigned request, among those with room; with the prompt tokens expected cached there. A worker's
    cache is what its engine holds, or what a request routed there and not yet prefilled will leave."""
    best = None
    for worker in takers:
        cached = worker.cached_tokens(request) if request.block_hashes else 0
        n = request.input_len - cached
        queued = worker.outstanding_tokens
        if queued and queued + n > queue_factor * worker.token_budget:
            continue
        cost = (worker.outstanding_tokens + n + request_tokens * len(worker.assigned), len(worker.assigned))
        if best is None or cost < best[0]:
            best = (cost, worker, cached)
    return None if best is None else (best[1], best[2])


def pick_decode(decoders: list[DecodeServer]) -> DecodeServer:
    """The decode server with the most free blocks (last heartbeat, minus what was sent since)."""
    return max(decoders, key=lambda w: (w.stats.num_free_blocks - w.pending_blocks,
                                        -(w.stats.num_running + w.stats.num_waiting)))


class SimScheduler:
    """services/scheduler/server.py: FCFS queue, prefill and decode assignment, the end of requests."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.queue: deque[str] = deque()
        self.takers: list[Server] = []
        self.decoders: list[DecodeServer] = []
        self.placed: dict[str, list[Server]] = {}  # the workers each request is assigned to

    def enqueue(self, rid: str) -> None:
        self.queue.append(rid)
        self.dispatch()

    def dispatch(self) -> None:
        factor = self.sim.cluster.prefill_queue_factor
        cluster = self.sim.cluster
        while self.queue:
            rid = self.queue[0]
            request = self.sim.requests[rid]
            if cluster.routing == "kv":
                route = route_prefill(self.takers, request, factor, cluster.route_request_tokens)
            else:
                worker = pick_prefill(self.takers, request.input_len, factor)
                route = None if worker is None else (worker, 0)
            if route is None:
                break  # FCFS: nobody overtakes the head
            worker, cached = route
            self.queue.popleft()
            worker.assigned[rid] = request.input_len - cached
            if request.block_hashes:
                worker.routed[rid] = request.block_hashes
            self.placed[rid] = [worker]
            self.sim.loop.after(self.sim.overheads.rpc_s, worker.submit, rid)

    def prefill_done(self, rid: str, worker: Server, finished: bool) -> None:
        worker.routed.pop(rid, None)  # its blocks are in the engine's cache now
        if worker.assigned.pop(rid, None) is not None:
            self.dispatch()  # it has room for more
        if rid not in self.placed:
            return
        if finished:
            self.finish(rid)
        elif isinstance(worker, ColocatedServer):
            worker.assigned[rid] = 0  # it decodes there too: still its request, no prompt left
        else:
            self._assign_decode(rid, worker)

    def _assign_decode(self, rid: str, source: PrefillServer) -> None:
        decoder = pick_decode(self.decoders)
        request = self.sim.requests[rid]
        decoder.pending_blocks += blocks_for(request.input_len + 1, decoder.spec.settings.block_size)
        self.placed[rid].append(decoder)
        self.sim.loop.after(self.sim.overheads.rpc_s, decoder.submit_kv, rid, source)

    def finish(self, rid: str) -> None:
        for worker in self.placed.pop(rid, []):
            worker.assigned.pop(rid, None)

    def fail(self, rid: str, error: str) -> None:
        self.sim.client.fail(rid, error, self.sim.loop.now + self.sim.overheads.reply_s)
        self.finish(rid)


class Client:
    """`bench serve` and the gateway: sends at the arrival time, records chunks, 429 when full."""

    def __init__(self, sim: Simulation, requests: list[SimRequest]) -> None:
        self.sim = sim
        self.records = {str(r.index): RequestRecord(r.index, r.input_len, r.output_len, r.arrival_s, r.arrival_s)
                        for r in requests}
        self.num_pending = 0  # at the gateway
        self.num_open = len(requests)  # not yet ended, sent or not

    def arrive(self, rid: str) -> None:
        request, sim = self.sim.requests[rid], self.sim
        if self.num_pending >= sim.cluster.max_pending:
            self._close(rid, f"429: the gateway has {self.num_pending} requests pending", sim.loop.now, False)
        elif request.input_len + request.output_len > sim.profile.model.max_model_len:
            self._close(rid, "400: prompt + max_tokens exceed the model's context", sim.loop.now, False)
        else:
            self.num_pending += 1
            sim.machine.admit()
            sim.loop.after(sim.overheads.gateway_s, sim.scheduler.enqueue, rid)

    def token(self, rid: str, t: float, last: bool) -> None:
        record = self.records[rid]
        if record.error is None:
            record.add_chunk(t)
            if last:
                self.sim.loop.at(t, self._end, rid)

    def fail(self, rid: str, error: str, t: float) -> None:
        if self.records[rid].error is None and self.records[rid].end_s is None:
            self.sim.loop.at(t, self._close, rid, error, t, True)

    def _end(self, rid: str) -> None:
        record = self.records[rid]
        record.end_s = self.sim.loop.now
        record.prompt_tokens, record.completion_tokens = record.input_len, len(record.chunk_times_s)
        record.finish_reason = "length"
        self.num_pending -= 1
        self.num_open -= 1

    def _close(self, rid: str, error: str, t: float, pending: bool) -> None:
        if self.records[rid].error is not None:  # failed twice over: count it once
            return
        self.records[rid].fail(error, t)
        self.num_pending -= pending
        self.num_open -= 1


class Simulation:
    """One run: the cluster, its scheduler and client, over a list of requests."""

    def __init__(self, profile: Profile, cluster: ClusterSpec, requests: list[SimRequest]) -> None:
        self.profile, self.cluster, self.overheads = profile, cluster, profile.overheads
        self.loop = EventLoop()
        # one machine with the profile's cores, or with as many as the cluster's workers take
        num_cores = max(cluster.num_cores, int(profile.machine.get("num_cores", 0)))
        self.machine = Machine(self.loop, num_cores, profile.overheads)
        self.requests = {str(r.index): r for r in requests}
        self.scheduler = SimScheduler(self)
        self.client = Client(self, requests)
        self._start_workers()
        for r in requests:
            self.loop.at(r.arrival_s, self.client.arrive, str(r.index))

    def _spec(self, role: Role, degree: int, settings: EngineSettings) -> EngineSpec:
        model = self.profile.model
        return EngineSpec(role, self.profile.degree(degree), settings, model.kv_bytes_per_token,
                          model.max_model_len, model.num_layers)

    def _start_workers(self) -> None:
        c = self.cluster
        if c.mode is not Mode.DISAGGREGATED:
            settings = replace(c.engine, chunk_size=c.chunk_size if c.mode is Mode.CHUNKED else None,
                               prefill_slice_ms=c.prefill_slice_ms if c.mode is Mode.LAYERED else None)
            spec = self._spec(Role.COLOCATED, c.prefill_degree, settings)
            self.scheduler.takers = [ColocatedServer(self, f"colocated-{i}", spec) for i in range(c.num_prefill)]
            return
        prefill = self._spec(Role.PREFILL, c.prefill_degree, c.engine)
        self.scheduler.takers = [PrefillServer(self, f"prefill-{i}", prefill)
                                 for i in range(c.num_prefill)]
        decode = self._spec(Role.DECODE, c.decode_degree, c.engine)
        self.scheduler.decoders = [DecodeServer(self, f"decode-{i}", decode) for i in range(c.num_decode)]
        for i, server in enumerate(self.scheduler.decoders):  # spread the heartbeats over an interval
            self.loop.at((i + 1) / (c.num_decode + 1) * c.heartbeat_interval_s, self._heartbeat, server)

    def _heartbeat(self, server: DecodeServer) -> None:
        server.heartbeat()
        if self.client.num_open:
            self.loop.after(self.cluster.heartbeat_interval_s, self._heartbeat, server)

    def run(self) -> list[RequestRecord]:
        self.loop.run()
        return [self.client.records[str(i)] for i in sorted(r.index for r in self.requests.values())]


def simulate(profile: Profile, cluster: ClusterSpec, requests: list[SimRequest]) -> list[RequestRecord]:
    """Every request's record, as `bench serve` would have written it against this cluster."""
    return Simulation(profile, cluster, requests).run()
