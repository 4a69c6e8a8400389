"""The scheduler's state machine: the FCFS queue, assignments, and the end of every request.

A request read from the stream stays pending in the consumer group until it finished or failed for
good; only then is it acknowledged (and deleted). A scheduler restart re-reads its pending entries,
and a request whose worker died goes back to the front of the queue and runs again from its prompt
(its seed is fixed, so it samples the same tokens; the gateway drops those it already has).

Shutting down (SIGTERM): a worker that drains is placed nothing new and hands back what it will not
finish, which runs elsewhere; the scheduler itself stops starting requests, waits for those in
flight, leaves the rest pending in the stream for its successor, and gives up the leader lease.

High availability: several schedulers may run; the one holding the leader lease (leader.py) reads
the streams and places requests, the others keep the worker registry warm from the same
registrations and heartbeats. A standby that takes the lease waits for a round of heartbeats (each
carries the ids its worker holds), claims every pending entry of the group, adopts the requests a
decode or colocated worker is running, and queues the rest. Its calls to workers carry its epoch; a
worker's refusal of an older one (ABORTED) tells a deposed leader to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import structlog

from splitserve.common.auth import EPOCH_METADATA_KEY
from splitserve.common.logging import describe
from splitserve.common.rpc import ChannelCache
from splitserve.common.service import Background, Progress
from splitserve.common.tracing import NO_TRACER, Span, Tracer
from splitserve.engine.block_manager import block_hashes, blocks_for, routing_key
from splitserve.queue.streams import ProtoCodec, ReplyWriter, RequestStream, StreamEntry
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb

from .config import SchedulerConfig
from .leader import Lease
from .registry import ROLE_NAMES, Registry, WorkerEntry
from .replan import Replanner
from .tombstones import Tombstones
from .workload import WorkloadEstimator

log = structlog.get_logger(__name__)
KV_CAPABILITY_BYTES = 24  # random bytes of a request's KV capability (32 URL-safe characters)
FLUSH_TIMEOUT_S = 10.0  # a drain's wait for acknowledgements and RPCs already under way
MAX_REQUEST_ID_CHARS = 128  # a cancel naming a longer id names no request a gateway made
MAX_RUNS = 4  # a request put back in the queue this often (its workers kept failing it) fails for good
READ_BATCH = 64  # stream entries read at most per XREADGROUP
CLAIM_INTERVAL_S = 5.0  # how often the leader takes over entries a deposed leader left idle


class Deposed(Exception):
    """Another scheduler leads now: this one exits (its supervisor starts it again, as a standby)."""


def handle_is_from(kv: pb.KvHandle, grpc_address: str) -> bool:
    """Whether a KV handle names its prefill server's registered gRPC address and, over UCX, a
    listener on that same host (Register checked that host against the worker's connection)."""
    if kv.prefill_grpc_address != grpc_address:
        return False
    return kv.transport != pb.KV_TRANSPORT_UCX or kv.ucx_address.rpartition(":")[0] == grpc_address.rpartition(":")[0]


def handle_mismatch(kv: pb.KvHandle, worker: spb.WorkerInfo, num_prompt_tokens: int) -> str | None:
    """What a prefill server's KV handle says that its registration and the request contradict
    (None: nothing): a decode server is chosen, and its blocks counted, by the handle's layout."""
    if kv.layout != worker.kv_layout or kv.transport != worker.kv_transport:
        return "is not in the layout and transport it registered"
    if kv.num_tokens != num_prompt_tokens:
        return f"holds {kv.num_tokens} tokens for a prompt of {num_prompt_tokens}"
    return None


class Stage(enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    AWAITING_DECODE = "awaiting_decode"  # prefilled, no decode server could take it yet
    DECODE = "decode"


# Past prefill, on a prefill server: its KV blocks wait there for a decode server's pull.
_KV_AWAITED = (Stage.AWAITING_DECODE, Stage.DECODE)


@dataclass
class Tracked:
    entry_id: bytes
    request: pb.QueuedRequest
    stage: Stage = Stage.QUEUED
    prefill_id: str | None = None
    decode_id: str | None = None
    done: spb.PrefillDoneRequest | None = None
    runs: int = 1  # times it was started: requeues add one
    waiting_since: float = field(default_factory=time.time)  # waits for a placement since (its trace's)
    _keys: dict[tuple[str, int], list[int]] = field(default_factory=dict, repr=False)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def waits(self, stage: Stage) -> None:
        """Back to waiting for a placement: QUEUED for a prefill server, AWAITING_DECODE for a decode server."""
        self.stage, self.waiting_since = stage, time.time()

    def prefix_keys(self, worker: WorkerEntry) -> list[int]:
        """The routing keys of the prompt's full blocks before the one holding its last token, hashed
        as worker hashes them (none when it caches nothing); computed once per kind of worker."""
        namespace, block_size = worker.namespace, worker.info.kv_layout.block_size
        if not namespace or block_size < 1:
            return []
        keys = self._keys.get((namespace, block_size))
        if keys is None:
            tokens = self.request.prompt_token_ids
            hashes = block_hashes(tokens[:len(tokens) - 1], block_size, self.request.cache_salt or None,
                                  namespace)
            keys = self._keys[(namespace, block_size)] = [routing_key(h) for h in hashes]
        return keys


class SchedulerServer:
    def __init__(self, config: SchedulerConfig, stream: RequestStream, redis,
                 cancels: RequestStream | None = None, tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.tracer = tracer  # placement spans, under the gateway's request span
        self.stream = stream
        self.cancels = cancels  # the cancel stream (request ids), read through the same group
        self.cancelled_early = Tombstones()  # cancels read before their requests
        self.replies = ReplyWriter(redis, ProtoCodec(pb.TokenEvent))
        self.lease = Lease(redis, config.consumer, config.leader_lease_s)
        self.epoch = 0  # this scheduler's fencing epoch once it took the lease
        self.leading = asyncio.Event()  # set once it leads and has taken over
        self._taking_over: asyncio.Task | None = None  # from taking the lease until it leads
        self._deposed = asyncio.Event()  # a worker refused this scheduler's epoch
        self.deposed_reason = ""
        self.heard = asyncio.Event()  # a worker registered or heartbeated
        self._aborting: dict[tuple[str, str], asyncio.Future] = {}  # (worker, request): Abort under way
        self.registry = Registry(config.prefill_queue_factor, config.route_request_tokens)
        self.workload = WorkloadEstimator(config.workload_window_s)
        self.replanner = Replanner(config.plan, self.workload, self.registry) if config.plan else None
        self.queue: deque[str] = deque()
        self.tracked: dict[str, Tracked] = {}
        self.wake = asyncio.Event()
        self.dequeued = asyncio.Event()  # the queue shrank: reading, paused at max_queued, may resume
        self.progress = Progress()  # a request finished: what a drain waits on
        self.draining = False  # shutting down: start nothing new
        self._channels = ChannelCache(config.cluster_auth)  # one per worker address
        self.background = Background()

    # -- leadership -----------------------------------------------------------------------------

    async def lead_forever(self) -> None:
        """Take the leader lease when it is free and keep renewing it; raises Deposed when another
        scheduler turns out to hold it. Through a Redis outage the leader keeps leading (its state
        stays); should another have led meanwhile, the epochs tell, and it exits then. A take-over
        that fails raises its error here: holding the lease without leading would stall the cluster,
        where this scheduler's exit lets a standby (or its restart) take the lease."""
        try:
            await self._lead()
        finally:  # deposed or stopped part way through taking over: it must not go on leading
            if self._taking_over is not None:
                self._taking_over.cancel()

    async def _lead(self) -> None:
        lease_s = self.config.leader_lease_s
        while True:
            epoch = await self.lease.try_lead()
            if epoch == 0 and self.epoch:
                self.deposed_reason = f"another scheduler holds the leader lease (this one led epoch {self.epoch})"
                raise Deposed(self.deposed_reason)
            if epoch and not self.epoch:
                self.epoch = epoch
                # The lease is renewed meanwhile.
                self._taking_over = asyncio.create_task(self._take_over(), name="take-over")
            elif epoch and epoch != self.epoch:
                if epoch != self.epoch + 1:
                    self.deposed_reason = f"other schedulers led meanwhile (epoch {self.epoch}, now {epoch})"
                    raise Deposed(self.deposed_reason)
                log.warning("the leader lease ran out (redis unreachable?) and was taken again",
                            epoch=epoch, previous=self.epoch)
                self.epoch = epoch
            if self._taking_over is not None and self._taking_over.done():
                taking_over, self._taking_over = self._taking_over, None
                taking_over.result()
            await asyncio.sleep(lease_s / 3 if self.epoch else lease_s / 6)  # a timer, not a poll

    async def watch_deposed(self) -> None:
        """Raises Deposed once a worker refused this scheduler's epoch."""
        await self._deposed.wait()
        raise Deposed(self.deposed_reason)

    def _depose(self, reason: str) -> None:
        if not self._deposed.is_set():
            log.error("deposed: a worker refused this scheduler's epoch; exiting", reason=reason)
            self.deposed_reason = reason
            self._deposed.set()

    async def _take_over(self) -> None:
        """Lead from now on: hear a round of heartbeats, claim every pending entry, adopt what
        workers run, queue the rest, and abort on workers what no entry names."""
        started, epoch = time.monotonic(), self.epoch
        log.info("leader lease taken; taking over", epoch=epoch)
        await self._hear_every_worker(started)
        await self.stream.ensure_group()
        entries = sorted(await self.stream.claim(self.config.consumer), key=lambda e: e.entry_id)
        adopted = self._adopt(entries)
        self.leading.set()
        self.wake.set()
        log.info("leading", epoch=epoch, pending=len(entries), adopted=adopted, queued=len(self.queue),
                 workers=len(self.registry.workers), took_s=round(time.monotonic() - started, 2))

    async def _hear_every_worker(self, since: float) -> None:
        """Until every registered worker has reported what it holds since `since` (at least one
        heartbeat interval, so workers that must register again have), at most 2.5 intervals."""
        interval = self.config.heartbeat_interval_s
        deadline = since + 2.5 * interval
        while True:
            now = time.monotonic()
            fresh = all(w.heard_at >= since for w in self.registry.workers.values())
            if (fresh and now >= since + interval) or now >= deadline:
                return
            self.heard.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.heard.wait(), (since + interval if fresh else deadline) - now)

    def _adopt(self, entries: list[StreamEntry]) -> int:
        """Track the claimed entries: one a decode or colocated worker runs stays there; one only a
        prefill server holds is aborted there and queued, as is one no worker holds. Returns how many
        were adopted."""
        adopted = 0
        for entry in entries:
            rid = entry.message.request_id
            if rid in self.tracked:
                continue
            holders = [w for w in self.registry.workers.values() if rid in w.held]
            runner = next((w for w in holders if w.role != spb.WORKER_ROLE_PREFILL), None)
            if runner is None:
                for worker in holders:
                    self._abort_on(worker.instance_id, rid)
                self._queue_new(entry)
                continue
            tracked = self.tracked[rid] = Tracked(entry.entry_id, entry.message)
            prefill = next((w for w in holders if w.role == spb.WORKER_ROLE_PREFILL), runner)
            tracked.stage, tracked.prefill_id, tracked.decode_id = Stage.DECODE, prefill.instance_id, runner.instance_id
            colocated = runner.role == spb.WORKER_ROLE_COLOCATED
            runner.assigned[rid] = 0 if colocated else tracked.num_prompt_tokens
            runner.confirmed[rid] = runner.beats - 1  # it held it at its last heartbeat
            adopted += 1
        for worker in self.registry.workers.values():
            for rid in worker.held - self.tracked.keys():  # finished or cancelled under the last leader
                self._abort_on(worker.instance_id, rid)
        return adopted

    async def claim_forever(self) -> None:
        """Take over, now and then, entries another scheduler left idle (a deposed leader that read
        before it learned it was deposed)."""
        await self.leading.wait()
        while True:
            await asyncio.sleep(CLAIM_INTERVAL_S)  # a timer, not a poll
            min_idle_ms = int(self.config.claim_idle_s * 1000)
            stray = [e for e in await self.stream.claim(self.config.consumer, min_idle_ms)
                     if e.message.request_id not in self.tracked]
            if stray:
                log.warning("took over requests another scheduler left", count=len(stray))
                self._enqueue(stray)

    # -- reconciliation -------------------------------------------------------------------------

    def heartbeat(self, worker: WorkerEntry, held: set[str]) -> list[str]:
        """What a worker holds, as of its heartbeat (or registration): the leader runs again what it
        placed there that is gone, and aborts there what it does not know or placed elsewhere.

        Returns, when leading, the requests whose KV blocks this prefill server holds for a pull still
        to come (a decode server to take them, or one that has them queued until its memory frees):
        the server extends their leases, so that waiting for decode memory never outlasts them."""
        worker.held, worker.beats, worker.heard_at = held, worker.beats + 1, time.monotonic()
        self.heard.set()
        if not self.leading.is_set():
            return []
        awaited, prefill = [], worker.role == spb.WORKER_ROLE_PREFILL
        for rid in held:
            tracked = self.tracked.get(rid)
            if tracked is None or not self._placed_on(tracked, worker.instance_id):
                log.info("a worker holds a request that is done or runs elsewhere: aborted there",
                         request_id=rid, worker=worker.instance_id)
                self._abort_on(worker.instance_id, rid)
            elif prefill and tracked.prefill_id == worker.instance_id and tracked.stage in _KV_AWAITED:
                awaited.append(rid)
        for rid, beat in list(worker.confirmed.items()):
            tracked = self.tracked.get(rid)
            if tracked is None or not _runs_on(tracked, worker.instance_id):
                del worker.confirmed[rid]
            elif rid not in held and worker.beats >= beat + 2:
                # Two heartbeats since its Submit returned: the second was built after the worker had it.
                del worker.confirmed[rid]
                log.warning("a worker lost a request it was given (its report too): run again",
                            request_id=rid, worker=worker.instance_id)
                self._take_back(tracked, worker.instance_id, kv_not_pulled=False)
        return awaited

    # -- intake ---------------------------------------------------------------------------------

    async def consume_forever(self) -> None:
        """Read new entries of the stream, once leading (the takeover claimed the pending ones)."""
        await self.leading.wait()
        while not self.draining:
            count = min(READ_BATCH, await self._queue_room())
            self._enqueue(await self.stream.get(self.config.consumer, block_ms=5000, count=count))

    async def _queue_room(self) -> int:
        """How many more entries the queue takes, once it has room: at max_queued reading pauses (new
        requests wait in Redis, not here) until the queue drains."""
        while len(self.queue) >= self.config.max_queued:
            self.dequeued.clear()
            await self.dequeued.wait()
        return self.config.max_queued - len(self.queue)

    def _enqueue(self, entries: list[StreamEntry]) -> None:
        for entry in entries:
            rid = entry.message.request_id
            tracked = self.tracked.get(rid)
            if tracked is None and rid in self.cancelled_early:  # its client left before we read it
                log.info("request cancelled before it was read", request_id=rid)
                self.background.spawn(self.stream.ack(entry.entry_id))
            elif tracked is None:
                self._queue_new(entry)
            elif tracked.entry_id != entry.entry_id:  # a second request under an id in flight
                self.background.spawn(self._refuse_duplicate(entry))
        if entries:
            self.wake.set()

    def _queue_new(self, entry: StreamEntry) -> None:
        """Track a request not seen before and queue it last (it counts as an arrival)."""
        tracked = self.tracked[entry.message.request_id] = Tracked(entry.entry_id, entry.message)
        self.queue.append(tracked.request_id)
        self.workload.arrived(time.monotonic(), tracked.num_prompt_tokens, entry.message.sampling.max_tokens)

    async def _refuse_duplicate(self, entry: StreamEntry) -> None:
        request = entry.message
        error = f"request id {request.request_id!r} is already in flight"
        await self.replies.publish(request.reply_stream, pb.TokenEvent(
            request_id=request.request_id, finish_reason=pb.FINISH_REASON_ERROR, error=error))
        await self.stream.ack(entry.entry_id)

    # -- prefill assignment ---------------------------------------------------------------------

    async def dispatch_forever(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            self._retry_awaiting_decode()
            while self.queue and not self.draining:
                tracked = self.tracked[self.queue[0]]
                route = self._route(tracked)
                if route is None:
                    break  # FCFS: nobody overtakes the head; a PrefillDone or a new worker wakes us
                self.queue.popleft()
                self.dequeued.set()
                self._assign_prefill(tracked, *route)

    def _route(self, tracked: Tracked) -> tuple[WorkerEntry, int] | None:
        """The prefill server for the request, and the prompt tokens it is expected to have cached."""
        if self.config.routing == "kv":
            return self.registry.route_prefill(tracked.num_prompt_tokens, tracked.prefix_keys)
        worker = self.registry.pick_prefill(tracked.num_prompt_tokens)
        return None if worker is None else (worker, 0)

    def _assign_prefill(self, tracked: Tracked, worker: WorkerEntry, cached_tokens: int = 0) -> None:
        tracked.stage, tracked.prefill_id = Stage.PREFILL, worker.instance_id
        tracked.request.timeline.scheduled = time.time()
        worker.assigned[tracked.request_id] = tracked.num_prompt_tokens - cached_tokens
        if self.config.routing == "kv":  # its blocks are cached there once it ran: route alike there
            worker.routed[tracked.request_id] = tracked.prefix_keys(worker)
        span = self._placement_span("placement", tracked, worker, expected_cached_tokens=cached_tokens)
        self.background.spawn(self._submit_prefill(tracked, worker, span))

    async def _submit_prefill(self, tracked: Tracked, worker: WorkerEntry, span: Span) -> None:
        # A fresh KV capability for each run: only this prefill server and the decode server chosen
        # for the request learn it (it rides the KvHandle), and a replay makes older handles useless.
        tracked.request.kv_capability = secrets.token_urlsafe(KV_CAPABILITY_BYTES)
        stub = prefill_pb2_grpc.PrefillStub(self._channel(worker))
        await self._abort_done(worker.instance_id, tracked.request_id)
        try:
            await stub.Submit(tracked.request, timeout=self.config.rpc_timeout_s,
                              metadata=self._fencing() + span.metadata())
            log.info("assigned to prefill", request_id=tracked.request_id, worker=worker.instance_id)
        except grpc.aio.AioRpcError as exc:
            span.end(error=f"{exc.code().name}: {exc.details()}")
            await self._rpc_failed(tracked, worker, exc)
            return
        span.end()
        self._submitted(tracked, worker)

    def _placement_span(self, name: str, tracked: Tracked, worker: WorkerEntry, **attributes: int) -> Span:
        """The trace's span of a placement, from when the request began to wait for one to its Submit's
        answer; its context goes to the worker in the Submit's metadata."""
        return self.tracer.start(name, tracked.request.trace_context, tracked.waiting_since, **{
            "gen_ai.request.id": tracked.request_id, "splitserve.worker": worker.instance_id,
            "splitserve.run": tracked.runs, **{f"splitserve.{k}": v for k, v in attributes.items()}})

    def _fencing(self) -> tuple[tuple[str, str]]:
        return ((EPOCH_METADATA_KEY, str(self.epoch)),)

    def _submitted(self, tracked: Tracked, worker: WorkerEntry) -> None:
        """After a Submit: the worker has the request from now on (what reconciliation checks its
        heartbeats for), unless it was cancelled or taken off worker while the call was on its way
        (the Submit may have overtaken its Abort): then it is aborted there now."""
        if self._placed_on(tracked, worker.instance_id):
            worker.confirmed[tracked.request_id] = worker.beats
        else:
            self._abort_on(worker.instance_id, tracked.request_id)

    def _placed_on(self, tracked: Tracked, instance_id: str) -> bool:
        """Whether the request is still in flight (not finished or cancelled) and placed on this
        worker (not taken back from it meanwhile)."""
        return self.tracked.get(tracked.request_id) is tracked and instance_id in (tracked.prefill_id,
                                                                                     tracked.decode_id)

    async def _rpc_failed(self, tracked: Tracked, worker: WorkerEntry, exc: grpc.aio.AioRpcError) -> None:
        """An unreachable worker is dropped (its requests requeued); a draining or overloaded one's
        refusal places the request elsewhere or later; a refusal of this scheduler's epoch deposes
        it; a Submit that timed out may have arrived (a worker takes it between two engine steps,
        and one step can outlast the timeout): the request stays placed, and the heartbeats tell
        (missing from two after it: run again); any other refusal fails the request."""
        if exc.code() is grpc.StatusCode.ABORTED:
            self._depose(exc.details() or "")
            return
        if not self._placed_on(tracked, worker.instance_id):
            return  # finished, cancelled or taken back from it meanwhile (a hand-back, a dropped worker)
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            log.warning("worker unreachable", worker=worker.instance_id, code=exc.code().name)
            self.drop_worker(worker.instance_id)
        elif exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            log.warning("submit timed out; its worker's heartbeats will tell whether it took the request",
                        request_id=tracked.request_id, worker=worker.instance_id)
            self._submitted(tracked, worker)
        elif exc.code() is grpc.StatusCode.FAILED_PRECONDITION:  # it began draining before it told us
            log.info("worker draining, placing the request elsewhere", request_id=tracked.request_id,
                     worker=worker.instance_id)
            worker.draining = True
            self._take_back(tracked, worker.instance_id, kv_not_pulled=worker.role == spb.WORKER_ROLE_DECODE)
        elif exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and not _too_large(exc):
            # Full for now (its waiting queue, its RPCs). A message over gRPC's size limit is
            # RESOURCE_EXHAUSTED too, but would be refused everywhere: that one fails below.
            log.info("worker overloaded, placing the request later or elsewhere",
                     request_id=tracked.request_id, worker=worker.instance_id)
            worker.full = True  # until its next heartbeat
            self._place_again(tracked, worker)
        else:
            await self.fail(tracked.request_id, f"{worker.instance_id}: {exc.details()}")

    def _place_again(self, tracked: Tracked, worker: WorkerEntry) -> None:
        """Take back a request a worker refused as overloaded, without counting a run (nothing failed):
        a prefilled one to another decode server or, with none free, to wait for one (every heartbeat
        retries); one not started to the head of the queue."""
        worker.assigned.pop(tracked.request_id, None)
        if worker.role == spb.WORKER_ROLE_DECODE:
            tracked.decode_id = None
            tracked.waits(Stage.AWAITING_DECODE)
            self._assign_decode(tracked)
            return
        tracked.prefill_id = None
        tracked.waits(Stage.QUEUED)
        self.queue.appendleft(tracked.request_id)
        self.wake.set()

    # -- decode assignment ----------------------------------------------------------------------

    async def prefill_done(self, done: spb.PrefillDoneRequest) -> None:
        tracked = self.tracked.get(done.request_id)
        if tracked is not None and done.kv.capability and done.kv.capability != tracked.request.kv_capability:
            # An earlier run's (late, or sent again with a heartbeat): that run was replaced or aborted.
            log.info("a report of an earlier run of the request ignored", request_id=done.request_id,
                     worker=done.instance_id)
            return
        worker = self.registry.workers.get(done.instance_id)
        if worker is not None and worker.assigned.pop(done.request_id, None) is not None:
            self.wake.set()  # it has room for more
        if tracked is None or tracked.prefill_id != done.instance_id or tracked.stage is not Stage.PREFILL:
            # Cancelled, or reassigned after its worker was given up on: the KV it holds is no one's.
            # (A report sent again for a request already past prefill changes nothing.)
            if done.finish_reason == pb.FINISH_REASON_UNSPECIFIED and (
                    tracked is None or tracked.prefill_id != done.instance_id):
                self._abort_on(done.instance_id, done.request_id)
            return
        tracked.request.timeline.CopyFrom(done.timeline)
        if done.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            await self.finish(done.request_id, done.finish_reason, len(done.output_token_ids))
            return
        if worker is None:  # given up on meanwhile: nothing vouches for its handle; run it again
            self._requeue([tracked])
            return
        if worker.role != spb.WORKER_ROLE_COLOCATED and not handle_is_from(done.kv, worker.info.grpc_address):
            # A decode server pulls from where the handle says: only the prefill server's own addresses.
            log.error("a KV handle names addresses its prefill server did not register", request_id=done.request_id,
                      instance_id=done.instance_id, registered=worker.info.grpc_address,
                      grpc=done.kv.prefill_grpc_address[:80], ucx=done.kv.ucx_address[:80])
            await self.fail(done.request_id, "its prefill server reported its KV cache at an address it did "
                                             "not register")
            return
        if worker.role == spb.WORKER_ROLE_COLOCATED:
            # It decodes there too: still its request (a drop requeues it), but no prompt left to run.
            tracked.stage, tracked.decode_id = Stage.DECODE, worker.instance_id
            worker.assigned[done.request_id] = 0
            return
        mismatch = handle_mismatch(done.kv, worker.info, tracked.num_prompt_tokens)
        if mismatch is not None:
            log.error("a KV handle its prefill server's registration contradicts", request_id=done.request_id,
                      instance_id=done.instance_id, mismatch=mismatch)
            await self.fail(done.request_id, f"its prefill server reported a KV handle that {mismatch}")
            return
        if self.registry.takers(spb.WORKER_ROLE_DECODE) and not self.registry.decode_takers_for(done.kv):
            # Else it would wait for a decode server until its client gave up (504 after minutes).
            log.error("no decode server takes this prefill server's KV layout and transport",
                      request_id=done.request_id, instance_id=done.instance_id)
            await self.fail(done.request_id, "no decode server takes KV cache in the layout and transport "
                                             "its prefill server made it in (the cluster's prefill and "
                                             "decode servers are configured differently)")
            return
        tracked.done = done
        tracked.waits(Stage.AWAITING_DECODE)
        self._assign_decode(tracked)

    def _assign_decode(self, tracked: Tracked) -> bool:
        """Send a prefilled request to a decode server; False when none can take it yet."""
        kv_aware = self.config.routing == "kv"
        choice = self.registry.route_decode(tracked.done.kv, tracked.prefix_keys if kv_aware else None)
        worker, cached = choice if choice is not None else (None, 0)
        if worker is None and not self.registry.takers(spb.WORKER_ROLE_DECODE) and self.registry.takers(
                spb.WORKER_ROLE_COLOCATED):
            # No decode server will come back (a switch to colocated workers): run it again there.
            log.info("no decode server takes work; requeued for a colocated worker", request_id=tracked.request_id)
            self._requeue([tracked])
            return True
        if worker is None:
            log.warning("no decode server can take the request yet", request_id=tracked.request_id)
            return False
        kv = tracked.done.kv
        tracked.stage, tracked.decode_id = Stage.DECODE, worker.instance_id
        worker.pending_blocks += blocks_for(kv.num_tokens + 1, kv.layout.block_size) - cached
        worker.assigned[tracked.request_id] = tracked.num_prompt_tokens
        if kv_aware:  # cached there once it finished: the conversation's next turn goes there too
            worker.routed[tracked.request_id] = tracked.prefix_keys(worker)
        # Built now: by the time the task runs, a hand-back may have reset tracked.
        submit = decode_pb2.DecodeRequest(request=tracked.request, kv=kv,
                                          output_token_ids=tracked.done.output_token_ids)
        span = self._placement_span("decode placement", tracked, worker, expected_cached_tokens=cached)
        self.background.spawn(self._submit_decode(tracked, worker, submit, span))
        return True

    def _retry_awaiting_decode(self) -> None:
        for tracked in list(self.tracked.values()):
            if tracked.stage is Stage.AWAITING_DECODE and not self._assign_decode(tracked):
                return

    async def _submit_decode(self, tracked: Tracked, worker: WorkerEntry,
                             submit: decode_pb2.DecodeRequest, span: Span) -> None:
        await self._abort_done(worker.instance_id, tracked.request_id)
        try:
            await decode_pb2_grpc.DecodeStub(self._channel(worker)).Submit(
                submit, timeout=self.config.rpc_timeout_s, metadata=self._fencing() + span.metadata())
            log.info("assigned to decode", request_id=tracked.request_id, worker=worker.instance_id)
        except grpc.aio.AioRpcError as exc:
            span.end(error=f"{exc.code().name}: {exc.details()}")
            await self._rpc_failed(tracked, worker, exc)
            return
        span.end()
        self._submitted(tracked, worker)

    # -- the end of a request -------------------------------------------------------------------

    async def request_done(self, done: spb.RequestDoneRequest) -> None:
        tracked = self.tracked.get(done.request_id)
        # A colocated worker's RequestDone may overtake its own PrefillDone: it is still prefill_id.
        if tracked is not None and done.instance_id in (tracked.decode_id, tracked.prefill_id):
            await self.finish(done.request_id, done.finish_reason, done.num_output_tokens)

    async def finish(self, request_id: str, reason: int, num_output_tokens: int = 0) -> None:
        """Forget the request and acknowledge it in the stream: it will not run again."""
        tracked = self.tracked.pop(request_id, None)
        if tracked is None:
            return
        if reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH) and num_output_tokens > 0:
            self.workload.finished(time.monotonic(), num_output_tokens, tracked.num_prompt_tokens)
        for worker_id in (tracked.prefill_id, tracked.decode_id):
            worker = self.registry.workers.get(worker_id) if worker_id else None
            if worker is not None:
                worker.assigned.pop(request_id, None)
        self.progress.note()
        # Shielded: an RPC handler cancelled at its deadline (Redis down) must not abandon the ack,
        # or the request would run again after the next restart.
        try:
            await asyncio.shield(self.background.spawn(self.stream.ack(tracked.entry_id)))
        except Exception as exc:  # Redis gone for longer than acks wait: it may run again later
            log.error("request not acknowledged in the stream", request_id=request_id, error=describe(exc))
        log.info("request done", request_id=request_id, finish_reason=pb.FinishReason.Name(reason))

    async def fail(self, request_id: str, error: str) -> None:
        """Fail a request for good: tell its client why, then acknowledge it."""
        tracked = self.tracked.get(request_id)
        if tracked is None:
            return
        if request_id in self.queue:
            self.queue.remove(request_id)
            self.dequeued.set()
        log.warning("request failed", request_id=request_id, error=error)
        event = pb.TokenEvent(request_id=request_id, finish_reason=pb.FINISH_REASON_ERROR, error=error)
        try:
            await self.replies.publish(tracked.request.reply_stream, event)
        except Exception as exc:  # Redis gone too long: the client's gateway times it out instead
            log.error("could not tell the client its request failed", request_id=request_id, error=describe(exc))
        await self.finish(request_id, pb.FINISH_REASON_ERROR)

    async def cancels_forever(self) -> None:
        """Once leading, read the cancel stream (every pending entry first, whoever read it) and
        cancel each request."""
        await self.leading.wait()
        await self.cancels.ensure_group()
        backlog = await self.cancels.claim(self.config.consumer)
        while True:
            for entry in backlog:
                await self.cancel(entry.message)
                self.background.spawn(self.cancels.ack(entry.entry_id))
            backlog = await self.cancels.get(self.config.consumer, block_ms=5000)

    async def cancel(self, request_id: str) -> None:
        """Its client went away (or a stop string ended it): forget the request and abort it on the
        workers it was placed on. One not read yet is dropped when it is."""
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            log.warning("cancel of an id no gateway makes ignored", request_id=request_id[:64])
            return
        tracked = self.tracked.get(request_id)
        if tracked is None:
            self.cancelled_early.add(request_id)
            return
        if request_id in self.queue:
            self.queue.remove(request_id)
            self.dequeued.set()
        for worker_id in {tracked.prefill_id, tracked.decode_id} - {None}:
            self._abort_on(worker_id, request_id)
        await self.finish(request_id, pb.FINISH_REASON_ABORT)

    # -- workers --------------------------------------------------------------------------------

    def register(self, info: spb.WorkerInfo, stats: pb.WorkerStats) -> None:
        if info.instance_id in self.registry.workers:
            self.drop_worker(info.instance_id)  # a restart: what it held is gone
        self.registry.register(info, stats, time.monotonic())
        log.info("worker registered", worker=info.instance_id, role=spb.WorkerRole.Name(info.role),
                 address=info.grpc_address)
        self.wake.set()

    def drop_worker(self, instance_id: str, drained: bool = False) -> None:
        """Forget a worker and put every request it held back at the front of the queue, in order."""
        worker = self.registry.remove(instance_id)
        if worker is None:
            return
        self._channels.drop(worker.info.grpc_address)
        requeued = [self.tracked[r] for r in worker.assigned if r in self.tracked]
        # Prefilled requests still waiting for a decode server had their KV there: it is gone too.
        requeued += [t for t in self.tracked.values()
                     if t.stage is Stage.AWAITING_DECODE and t.prefill_id == instance_id and t not in requeued]
        self._requeue(requeued)
        if drained and not requeued:
            log.info("worker drained and gone", worker=instance_id)
        else:
            log.warning("worker dropped", worker=instance_id, requeued=len(requeued), drained=drained)

    def _requeue(self, requeued: list[Tracked]) -> None:
        """Put requests back at the front of the queue, oldest first, to run again from their prompts;
        one that has run MAX_RUNS times fails instead."""
        for tracked in sorted(requeued, key=lambda t: t.entry_id, reverse=True):
            for worker_id in (tracked.prefill_id, tracked.decode_id):
                worker = self.registry.workers.get(worker_id) if worker_id else None
                if worker is not None:
                    worker.assigned.pop(tracked.request_id, None)
            tracked.prefill_id, tracked.decode_id, tracked.done = None, None, None
            tracked.waits(Stage.QUEUED)
            tracked.runs += 1
            if tracked.runs > MAX_RUNS:
                self.background.spawn(self.fail(tracked.request_id, f"gave up after {MAX_RUNS} attempts: "
                                                                     "its workers kept failing or handing it back"))
                continue
            self.queue.appendleft(tracked.request_id)
        self.progress.note()  # a drain waits for requests in flight, and these no longer are
        self.wake.set()

    def drain_worker(self, instance_id: str, finished: bool) -> None:
        """A worker is shutting down: place nothing more on it; once finished, forget it."""
        worker = self.registry.workers.get(instance_id)
        if worker is None:
            return
        if finished:
            self.drop_worker(instance_id, drained=True)
        elif not worker.draining:
            worker.draining = True
            log.info("worker draining", worker=instance_id, assigned=len(worker.assigned))
            self.wake.set()  # what waits for room may fit elsewhere now

    def hand_back(self, back: spb.HandBackRequest) -> None:
        """A draining worker gives back a request it will not finish."""
        tracked = self.tracked.get(back.request_id)
        if tracked is None or back.instance_id not in (tracked.prefill_id, tracked.decode_id):
            return  # finished, cancelled, or already placed elsewhere
        log.info("request handed back", request_id=back.request_id, worker=back.instance_id,
                 kv_not_pulled=back.kv_not_pulled)
        self._take_back(tracked, back.instance_id, back.kv_not_pulled)

    def _take_back(self, tracked: Tracked, instance_id: str, kv_not_pulled: bool) -> None:
        """Take a request off a worker: to another decode server when its KV still waits on the prefill
        server, else back to the queue. A decode server it was sent to drops its copy."""
        worker = self.registry.workers.get(instance_id)
        if worker is not None:
            worker.assigned.pop(tracked.request_id, None)
        if kv_not_pulled and instance_id == tracked.decode_id and tracked.done is not None:
            tracked.decode_id = None
            tracked.waits(Stage.AWAITING_DECODE)
            self._assign_decode(tracked)
            return
        if tracked.decode_id not in (None, instance_id):
            self._abort_on(tracked.decode_id, tracked.request_id)
        self._requeue([tracked])

    def _abort_on(self, instance_id: str, request_id: str) -> None:
        """Have a worker drop a request and free what it holds for it (nothing, if it has nothing).
        Until the Abort is answered, no Submit of the request goes to that worker (_abort_done): it
        could be overtaken by the Abort, which would then drop the new run."""
        key = (instance_id, request_id)
        task = self.background.spawn(self._abort(instance_id, request_id))
        self._aborting[key] = task
        task.add_done_callback(lambda done: self._aborting.pop(key) if self._aborting.get(key) is done else None)

    async def _abort_done(self, instance_id: str, request_id: str) -> None:
        """Until an Abort of the request on the worker, if one is under way, was answered."""
        task = self._aborting.get((instance_id, request_id))
        if task is not None:
            await asyncio.wait([task])

    async def reset_prefix_caches(self) -> pb.ResetPrefixCacheResponse:
        """Every prefill and colocated worker forgets its cached prefixes (decode workers cache none)."""
        workers = [w for w in self.registry.workers.values() if w.role != spb.WORKER_ROLE_DECODE]
        answers = await asyncio.gather(*map(self._reset_prefix_cache, workers))
        done = [a for a in answers if a is not None]
        return pb.ResetPrefixCacheResponse(num_workers=len(done), num_blocks=sum(a.num_blocks for a in done),
                                           num_failed=len(answers) - len(done))

    async def _reset_prefix_cache(self, worker: WorkerEntry) -> pb.ResetPrefixCacheResponse | None:
        stub = prefill_pb2_grpc.PrefillStub(self._channel(worker))  # a colocated worker's too
        try:
            return await stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(),
                                               timeout=self.config.rpc_timeout_s, metadata=self._fencing())
        except grpc.aio.AioRpcError as exc:
            log.warning("prefix cache reset failed", worker=worker.instance_id, code=exc.code().name)
            return None

    async def _abort(self, instance_id: str, request_id: str) -> None:
        worker = self.registry.workers.get(instance_id)
        if worker is None:
            return
        # A colocated worker answers the Prefill service, as it is placed like a prefill server.
        stub = (decode_pb2_grpc.DecodeStub if worker.role == spb.WORKER_ROLE_DECODE
                else prefill_pb2_grpc.PrefillStub)(self._channel(worker))
        try:
            await stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.config.rpc_timeout_s,
                             metadata=self._fencing())
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.ABORTED:
                self._depose(exc.details() or "")
            else:  # its next heartbeat shows the request again, and the abort is sent again
                log.warning("abort failed", request_id=request_id, worker=instance_id, code=exc.code().name)

    async def drain(self, timeout_s: float) -> bool:
        """Shutting down: read no more requests and start none; wait up to timeout_s for those in
        flight. Requests not started stay pending in the stream for the next scheduler."""
        self.draining = True
        self.wake.set()
        log.info("draining", in_flight=self._num_in_flight(), queued=len(self.queue), timeout_s=timeout_s)
        drained = await self.progress.until(lambda: self._num_in_flight() == 0, timeout_s)
        with contextlib.suppress(TimeoutError):  # acknowledgements and submits under way
            await asyncio.wait_for(self.background.wait(), FLUSH_TIMEOUT_S)
        log.info("drained" if drained else "drain timed out; requests left pending in the stream",
                 in_flight=self._num_in_flight(), queued=len(self.queue))
        return drained

    def _num_in_flight(self) -> int:
        return sum(1 for t in self.tracked.values() if t.stage is not Stage.QUEUED)

    async def reap_forever(self) -> None:
        """Drop workers whose heartbeats stopped."""
        while True:
            await asyncio.sleep(self.config.worker_timeout_s / 2)  # a timer, not a poll
            for instance_id in self.registry.expired(time.monotonic(), self.config.worker_timeout_s):
                self.drop_worker(instance_id)

    def _channel(self, worker: WorkerEntry):
        return self._channels.get(worker.info.grpc_address, ROLE_NAMES[worker.role])

    def cluster_state(self) -> spb.ClusterState:
        now = time.monotonic()
        workers = [spb.WorkerState(worker=w.info, stats=w.stats, last_seen_s=now - w.last_seen,
                                   draining=w.draining)
                   for w in self.registry.workers.values()]
        return spb.ClusterState(workers=workers, num_waiting=len(self.queue),
                                num_running=len(self.tracked) - len(self.queue),
                                workload=self.workload.estimate(now), recommendation=self.recommendation(),
                                leader=self.leading.is_set(), epoch=self.epoch)

    def recommendation(self) -> spb.Recommendation:
        return self.replanner.recommendation if self.replanner else spb.Recommendation(available=False)


def _runs_on(tracked: Tracked, instance_id: str) -> bool:
    """Whether the request should be held by this worker now: prefilling there, or decoding there."""
    return ((tracked.stage is Stage.PREFILL and tracked.prefill_id == instance_id)
            or (tracked.stage is Stage.DECODE and tracked.decode_id == instance_id))


def _too_large(exc: grpc.aio.AioRpcError) -> bool:
    """gRPC's own refusal of a message over its size limit (sent or received)."""
    return "message larger than max" in (exc.details() or "")
