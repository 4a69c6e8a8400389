"""Plumbing every worker (prefill, decode, colocated) shares: its registration, stats, the scheduler
link, ordered reply publishing, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import grpc
import structlog

from splitserve.common.auth import EPOCH_METADATA_KEY
from splitserve.common.net import advertised_host
from splitserve.common.protoconv import (
    finish_to_proto,
    layout_to_proto,
    logprobs_to_proto,
    sampling_from_proto,
)
from splitserve.common.rpc import NOT_SERVING, open_channel
from splitserve.common.service import Background, Progress
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request import RequestState, SamplingParams, StepOutput
from splitserve.queue.streams import ProtoCodec, ReplyWriter
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.v1 import scheduler_pb2_grpc
from splitserve.worker.config import WorkerConfig
from splitserve.worker.engine_loop import EngineLoop

log = structlog.get_logger(__name__)
FLUSH_TIMEOUT_S = 10.0  # at exit, how long the last tokens and reports may take to go out


class Draining(Exception):
    """Raised by a worker's Submit while it shuts down (gRPC FAILED_PRECONDITION): place it elsewhere."""

    def __init__(self) -> None:
        super().__init__("this worker is draining (shutting down); it takes no new requests")


def worker_info(config: WorkerConfig, role: int, grpc_address: str, engine: LLMEngine) -> spb.WorkerInfo:
    return spb.WorkerInfo(
        instance_id=config.instance_id, role=role, grpc_address=grpc_address,
        model=engine.loaded.source.name, max_model_len=engine.max_model_len,
        token_budget=config.engine.token_budget, max_num_seqs=config.engine.max_num_seqs,
        kv_layout=layout_to_proto(engine.layout), kv_transport=config.kv_transport_proto,
        num_cores=_parallelism(config.engine.device), prefix_cache_namespace=engine.cache_namespace,
    )


def _parallelism(device: str) -> int:
    """Cores on CPU (the torch threads it runs with), one device on a GPU."""
    import torch

    return torch.get_num_threads() if device == "cpu" else 1


def engine_stats(engine: LLMEngine) -> pb.WorkerStats:
    """Load and KV usage of an engine; call on the engine thread."""
    held = [s for s in engine.sequences.values() if s.state is RequestState.KV_READY]
    waiting = engine.scheduler.waiting
    return pb.WorkerStats(
        num_blocks=engine.blocks.num_blocks,
        num_free_blocks=engine.blocks.num_free_blocks,
        num_running=len(engine.scheduler.running) + len(engine.scheduler.prefilling) + len(held),
        num_waiting=len(waiting),
        num_queued_prompt_tokens=sum(s.num_prompt_tokens for s in waiting),
        num_held=len(held),
        prefix_cache_queries=engine.prefix_cache_stats.queries,
        prefix_cache_hits=engine.prefix_cache_stats.hits,
    )


def loop_stats(loop: EngineLoop) -> pb.WorkerStats:
    """The engine's load after its latest step, with its step histograms (a copy: callers add to it)."""
    stats = pb.WorkerStats()
    stats.CopyFrom(loop.snapshot)
    stats.steps.extend(loop.steps.to_proto())
    return stats


REPORT_ATTEMPTS = 3  # a report's own call, before it is left to the heartbeats
MAX_REPORTS_PER_HEARTBEAT = 256
Report = spb.PrefillDoneRequest | spb.RequestDoneRequest


class Fence:
    """The newest scheduler epoch this worker has seen. A call from an older one (a leader that was
    deposed and does not know it yet) is refused with ABORTED, which tells it so."""

    def __init__(self) -> None:
        self.epoch = 0

    def see(self, epoch: int) -> None:
        self.epoch = max(self.epoch, epoch)

    async def check(self, context) -> None:
        """Admit a scheduler's call (Submit, Abort) only from the newest epoch."""
        value = dict(context.invocation_metadata()).get(EPOCH_METADATA_KEY, "0")
        epoch = int(value) if value.isdigit() and len(value) < 19 else 0
        if epoch < self.epoch:
            await context.abort(grpc.StatusCode.ABORTED, f"scheduler epoch {epoch} was superseded by epoch "
                                                         f"{self.epoch}: that scheduler no longer leads")
        self.see(epoch)


class _Scheduler:
    """One scheduler this worker registers and heartbeats with."""

    def __init__(self, address: str, config: WorkerConfig) -> None:
        self.address = address
        self.channel = open_channel(address, config.cluster_auth, "scheduler")
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.leader = False  # as it last said
        self.cache_version_sent: int | None = None  # of the cached blocks it has from us; None: none


class SchedulerLink:
    """This worker's link to its schedulers (one, or a leader and standbys).

    It registers with each and heartbeats to each: a standby keeps its registry warm for a takeover.
    A heartbeat carries the ids of every request this worker holds, so the leader can requeue what
    it placed here that is gone and abort here what it does not know, and, when they changed, the
    routing keys of every block in the prefix cache. Reports (PrefillDone,
    RequestDone) go to the leader; one whose call does not get through rides every heartbeat until
    one to the leader delivers it, and its request counts as held until then.
    """

    def __init__(self, config: WorkerConfig, info: spb.WorkerInfo, stats, held, fence: Fence,
                 cache=None, kv_awaited=None) -> None:
        # stats: async () -> WorkerStats, answered without waiting for an engine step;
        # held: () -> ids of the requests this worker holds; fence: the server's, which learns the
        # newest epoch from the schedulers' answers too; cache: () -> (version, routing keys) of the
        # prefix cache (EngineLoop.published_cache), None when the worker publishes none;
        # kv_awaited: (ids) -> None, a prefill server's, told by each of the leader's heartbeat
        # answers the held requests whose KV blocks it still awaits a pull of (their leases go on).
        self.config, self.info, self._stats, self._held, self.fence = config, info, stats, held, fence
        self._cache, self._kv_awaited = cache, kv_awaited
        self.schedulers = [_Scheduler(address, config) for address in config.schedulers]
        self._owed: dict[tuple[str, str], Report | None] = {}  # reports not yet delivered (None: not sent yet)
        self.draining = False
        self.gone = False  # drained and about to exit: no more heartbeats, never re-register

    @property
    def leader(self) -> _Scheduler:
        return next((s for s in self.schedulers if s.leader), self.schedulers[0])

    @property
    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        """The leader's (as far as this worker knows)."""
        return self.leader.stub

    async def run(self) -> None:
        """Register with every scheduler (retrying until each answers), then heartbeat forever."""
        await asyncio.gather(*(self._run_with(s) for s in self.schedulers))

    async def _run_with(self, scheduler: _Scheduler) -> None:
        await self._register(scheduler)
        while not self.gone:
            await asyncio.sleep(self.config.heartbeat_interval_s)  # a timer, not a poll
            await self._heartbeat(scheduler)
        await asyncio.Event().wait()  # gone: idle until the process ends

    def _held_ids(self) -> list[str]:
        return [*self._held(), *(rid for _, rid in self._owed)]

    async def _register(self, scheduler: _Scheduler) -> None:
        delay = 0.2
        while True:
            try:
                request = spb.RegisterRequest(worker=self.info, stats=await self._stats(),
                                              held_request_ids=self._held_ids())
                response = await scheduler.stub.Register(request, timeout=5)
                self._heard(scheduler, response.leader, response.epoch)
                scheduler.cache_version_sent = None  # a new registry entry: it holds no cached blocks
                log.info("registered", scheduler=scheduler.address, leader=response.leader,
                         instance_id=self.info.instance_id)
                if self.draining:  # a scheduler that forgot us must not place work here again
                    await self._drain_with(scheduler, False)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # A configuration error (the cluster token, the advertised address): say so loudly.
                    log.error("the scheduler refused this worker, retrying", scheduler=scheduler.address,
                              code=exc.code().name, reason=exc.details(), retry_in_s=delay)
                else:
                    log.warning("scheduler unreachable, retrying", scheduler=scheduler.address,
                                code=exc.code().name, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _heartbeat(self, scheduler: _Scheduler) -> None:
        owed = [(key, report) for key, report in self._owed.items() if report is not None]
        owed = owed[:MAX_REPORTS_PER_HEARTBEAT]
        request = spb.HeartbeatRequest(
            instance_id=self.info.instance_id, stats=await self._stats(), held_request_ids=self._held_ids(),
            prefill_done=[r for _, r in owed if isinstance(r, spb.PrefillDoneRequest)],
            request_done=[r for _, r in owed if isinstance(r, spb.RequestDoneRequest)])
        version, keys = self._cache() if self._cache else (None, [])
        if version != scheduler.cache_version_sent:
            request.cached_blocks.SetInParent()  # set even when empty: the cache was emptied
            request.cached_blocks.keys.extend(keys)
        try:
            response = await scheduler.stub.Heartbeat(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND and not self.gone:
                await self._register(scheduler)
            else:
                log.warning("heartbeat failed", scheduler=scheduler.address, code=exc.code().name)
            return
        self._heard(scheduler, response.leader, response.epoch)
        scheduler.cache_version_sent = version
        if response.leader:
            for key, report in owed:
                self._delivered(key, report)
            if owed:
                log.info("reports delivered with a heartbeat", count=len(owed))
            if self._kv_awaited and response.epoch >= self.fence.epoch:  # not a deposed leader's word
                self._kv_awaited(response.kv_awaited_ids)

    def _heard(self, scheduler: _Scheduler, leader: bool, epoch: int) -> None:
        self.fence.see(epoch)
        if leader:
            for other in self.schedulers:
                other.leader = other is scheduler
        else:
            scheduler.leader = False

    # -- reports ------------------------------------------------------------------------------

    def owe(self, report_type: type[Report], request_id: str) -> None:
        """A request left this worker (or finished its prefill) and its report is on its way: it counts
        as held until the report is delivered. Call at once, in the step that ended it."""
        self._owed[(report_type.__name__, request_id)] = None

    async def report(self, report: Report) -> None:
        """Deliver a report to the leader; if its own call fails, the heartbeats carry it."""
        key = (type(report).__name__, report.request_id)
        self._owed[key] = report
        rpc = "PrefillDone" if isinstance(report, spb.PrefillDoneRequest) else "RequestDone"
        delay = 0.2
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            scheduler = self.leader
            try:
                await getattr(scheduler.stub, rpc)(report, timeout=5.0)
                self._delivered(key, report)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE):
                    self._heard(scheduler, False, 0)  # a standby, or gone: ask another
                    self._try_next_leader(scheduler)
                elif exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                    log.error(f"{rpc} refused", code=exc.code().name, reason=exc.details())
                    self._delivered(key, report)
                    return
                if attempt == REPORT_ATTEMPTS:
                    log.warning(f"{rpc} not delivered; the heartbeats carry it", code=exc.code().name,
                                request_id=report.request_id)
                    return
                await asyncio.sleep(delay)
                delay *= 2

    def _try_next_leader(self, refused: _Scheduler) -> None:
        """Guess the scheduler after `refused` leads, until a heartbeat says which does."""
        i = self.schedulers.index(refused)
        following = self.schedulers[i + 1:] + self.schedulers[:i]
        if following:
            following[0].leader = True

    def _delivered(self, key: tuple[str, str], report: Report) -> None:
        if self._owed.get(key) is report:
            del self._owed[key]

    # -- drain --------------------------------------------------------------------------------

    async def drain(self, finished: bool = False) -> None:
        """Tell every scheduler this worker is draining (nothing new), or, finished, that it exits now."""
        self.draining = True
        self.gone = self.gone or finished
        await asyncio.gather(*(self._drain_with(s, finished) for s in self.schedulers))

    async def _drain_with(self, scheduler: _Scheduler, finished: bool) -> None:
        request = spb.DrainRequest(instance_id=self.info.instance_id, finished=finished)
        await call_with_retries(scheduler.stub.Drain, request, what="Drain", attempts=3, timeout_s=5.0)

    async def hand_back(self, request_id: str, kv_not_pulled: bool = False) -> None:
        """Give a request this draining worker will not finish back to the leader (should this call
        be lost, the leader sees it missing from the heartbeats and runs it again)."""
        request = spb.HandBackRequest(request_id=request_id, instance_id=self.info.instance_id,
                                      kv_not_pulled=kv_not_pulled)
        await call_with_retries(self.stub.HandBack, request, what="HandBack", request_id=request_id)


def token_event(request: pb.QueuedRequest, index: int, out: StepOutput) -> pb.TokenEvent:
    """The event carrying one output token at position index; the last one of a request stamps
    `finish` and carries the whole Timeline. A failed step's event has no token, and says why."""
    token_ids = [] if out.token_id is None else [out.token_id]
    event = pb.TokenEvent(request_id=out.request_id, token_ids=token_ids, index=index,
                          finish_reason=finish_to_proto(out.finish_reason), error=out.error or "")
    if index == 0:
        event.num_cached_tokens = out.num_cached_tokens
    if out.logprobs is not None:
        event.logprobs.append(logprobs_to_proto(out.logprobs))
    if out.prompt_logprobs is not None:
        event.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in out.prompt_logprobs)
    if out.finish_reason is not None:
        request.timeline.finish = time.time()
        event.timeline.CopyFrom(request.timeline)
    return event


async def grammar_matcher(engine, params: SamplingParams, output: list[int]):
    """params.grammar's matcher fed output, built on a thread of its own: a large grammar takes up
    to a second, which must not stall the engine thread's other requests. ValueError for a grammar
    llguidance refuses; None without a grammar."""
    if params.grammar is None:
        return None
    return await asyncio.to_thread(engine.grammars.matcher, params.grammar, output)


async def add_to_engine(loop, tracked: dict, request: pb.QueuedRequest, entry) -> None:
    """Track entry under the request's id, then queue the request in the engine (loop: EngineLoop).

    Tracked first, because the engine's step may end before the call returns; untracked again if
    the engine refuses the request (its error, ValueError or RequestIdBusy, raised here).
    """
    rid = request.request_id
    params = sampling_from_proto(request.sampling)
    ids = list(request.prompt_token_ids)
    salt = request.cache_salt or None
    tracked[rid] = entry

    def untrack() -> None:
        if tracked.get(rid) is entry:
            del tracked[rid]

    try:
        matcher = await grammar_matcher(loop.engine, params, [])
    except BaseException:  # a grammar refused, or the Submit's caller gone (its deadline): never queued
        untrack()
        raise
    if tracked.get(rid) is not entry:  # aborted while its grammar was built
        return
    # The engine takes it between two steps, maybe after the Submit's deadline cancelled this call:
    # its refusal must untrack it even then (else heartbeats would list a request that never runs).
    added = asyncio.ensure_future(loop.call(lambda e: e.add_request(rid, ids, params, salt, matcher)))
    added.add_done_callback(lambda done: done.cancelled() or done.exception() is None or untrack())
    await asyncio.shield(added)


class RunningServer(Protocol):
    """A decode or colocated server: requests that run to their last token here."""

    requests: dict
    progress: Progress

    async def drop(self, request_id: str, why: str = "aborted") -> bool:
        """Forget a request and free its blocks; False when it was not here."""


async def drain_requests(server: RunningServer, link: SchedulerLink, early: list[str], timeout_s: float,
                         kv_not_pulled: bool = False) -> None:
    """Hand back `early` at once; give the other requests timeout_s to finish; hand back the rest,
    to run again from their prompts. A request is dropped before it is handed back, so none of its
    tokens goes out once the scheduler has it back."""
    async def hand_back(rids: list[str], kv_intact: bool) -> None:
        async def one(rid: str) -> None:
            if await server.drop(rid, "handed back"):
                await link.hand_back(rid, kv_intact)
        await asyncio.gather(*map(one, rids))

    await hand_back(early, kv_not_pulled)
    log.info("draining", running=len(server.requests), handed_back_early=len(early), timeout_s=timeout_s)
    await server.progress.until(lambda: not server.requests, timeout_s)
    running = list(server.requests)
    await hand_back(running, False)
    log.info("drained", handed_back_early=len(early), handed_back_running=len(running))


class DrainableServer(Protocol):
    """What worker_shutdown needs of a prefill, decode or colocated server."""

    draining: bool
    loop: EngineLoop
    replies: ReplyPublisher

    async def drain(self, link: SchedulerLink, timeout_s: float) -> None:
        """Finish what it holds, within timeout_s, and hand the rest back through link."""


def worker_shutdown(health, grpc_server, server: DrainableServer, link: SchedulerLink, timeout_s: float):
    """What a worker does on SIGTERM: refuse new requests, tell the scheduler, finish or hand back what
    it holds (server.drain), send its last tokens and reports, say it is gone, and stop.

    After a failed engine step there is nothing to finish: the scheduler requeues the worker's
    requests when it hears it is gone.
    """
    async def shutdown() -> None:
        server.draining = True  # Submit refuses from here on
        await health.set("", NOT_SERVING)
        if not server.loop.failed.done():
            await link.drain()
            await server.drain(link, timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.replies.flush(), FLUSH_TIMEOUT_S)
        await link.drain(finished=True)
        await grpc_server.stop(2)
        await server.loop.stop()
    return shutdown


def advertised_address(config: WorkerConfig, port: int) -> str:
    return f"{advertised_host(config.host)}:{port}"


async def call_with_retries(rpc, request, what: str, attempts: int = 5, timeout_s: float = 10.0, **fields):
    """Call a unary RPC, retrying with backoff (Drain, HandBack: should one still be lost, the
    scheduler reconciles from the heartbeats); fields go with the error logged after the last try."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await rpc(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if attempt == attempts or exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                log.error(f"{what} failed", code=exc.code().name, attempts=attempt, **fields)
                return None
            await asyncio.sleep(delay)
            delay *= 2


class ReplyPublisher:
    """Appends TokenEvents to their reply streams in the order they were produced, batching what
    piles up.

    Concurrent appends from separate tasks could overtake one another on different Redis
    connections; one sender task keeps each request's tokens in order.
    """

    def __init__(self, client) -> None:
        self._writer = ReplyWriter(client, ProtoCodec(pb.TokenEvent))
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._background = Background()

    def send(self, events: list[tuple[str, pb.TokenEvent]], then=None) -> None:
        """Queue (stream, event) pairs; `then` (a coroutine function) runs once they are out."""
        self._outbox.put_nowait((events, then))

    async def run(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            await self._writer.publish_many([e for events, _ in batch for e in events])
            for _, then in batch:
                if then is not None:
                    self._background.spawn(then())
                self._outbox.task_done()

    async def flush(self) -> None:
        """Until everything sent so far is published and its follow-ups (reports) have run."""
        await self._outbox.join()
        await self._background.wait()
