"""Every queue, cache and buffer a client or a peer can grow has a bound, and a clear refusal past it.

Pure classes and in-process servers only (no model, no cluster): the scheduler's stream read-ahead
and its handling of overloaded workers, the decode server's waiting queue and KV-handle checks,
the channel and endpoint caches, the pullers' receive buffers, the PullKv deadline, cancelled-id
tombstones, and the gRPC server limits.
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.bench.kv_serve import KvOnlyPrefillServicer, SyntheticKvSource, make_payload, payload_id
from splitserve.common.auth import NO_AUTH
from splitserve.common.protoconv import layout_to_proto
from splitserve.engine.block_manager import PrefixCacheStats
from splitserve.common.rpc import ChannelCache, add_health, bind, make_server, open_channel
from splitserve.engine.kv_cache import KVLayout
from splitserve.kv_transfer.base import InvalidKvHandle, KvPullError, check_handle
from splitserve.kv_transfer.grpc import GrpcKvPuller, GrpcKvServer, _receive
from splitserve.kv_transfer.ucx import UcxKvPuller
from splitserve.queue.streams import StreamEntry, connect
from splitserve.services.decode.server import DecodeServer
from splitserve.services.decode.servicer import DecodeServicer
from splitserve.services.scheduler import tombstones as tombstones_module
from splitserve.services.scheduler.config import SchedulerConfig
from splitserve.services.scheduler.registry import Registry
from splitserve.services.scheduler.server import SchedulerServer, Stage, Tracked
from splitserve.services.scheduler.tombstones import Tombstones
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import decode_pb2, prefill_pb2, prefill_pb2_grpc
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(60)
UNUSED_REDIS = "redis://127.0.0.1:1/0"  # a client that never connects
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=16, dtype=torch.bfloat16)


def kv_handle(prompt_tokens: int, sender: KVLayout = LAYOUT, **overrides) -> pb.KvHandle:
    """A handle as a prefill server with layout `sender` makes it for a prompt of prompt_tokens
    tokens; overrides replace its fields."""
    num_blocks = -(-prompt_tokens // sender.block_size)
    fields = dict(request_id="r1", prefill_grpc_address="127.0.0.1:1", ucx_address="127.0.0.1:1",
                  block_ids=list(range(num_blocks)), num_tokens=prompt_tokens, layout=layout_to_proto(sender),
                  num_bytes=num_blocks * sender.bytes_per_block)
    return pb.KvHandle(**{**fields, **overrides})


# -- tombstones -----------------------------------------------------------------------------------


def test_tombstones_keep_at_most_max_size_ids_dropping_the_oldest() -> None:
    tombstones = Tombstones(ttl_s=300.0, max_size=3)
    for rid in "abcde":
        tombstones.add(rid)
    assert len(tombstones) == 3
    assert [rid in tombstones for rid in "abcde"] == [False, False, True, True, True]


def test_tombstones_expire_from_the_front(monkeypatch) -> None:
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(tombstones_module.time, "monotonic", lambda: clock.now)
    tombstones = Tombstones(ttl_s=10.0)
    for now, rid in [(0.0, "a"), (5.0, "b"), (9.0, "a")]:  # a again: its time is renewed
        clock.now = now
        tombstones.add(rid)
    clock.now = 16.0
    tombstones.add("c")  # b (5.0) has expired; a (9.0) has not
    assert len(tombstones) == 2 and "a" in tombstones and "b" not in tombstones
    clock.now = 19.5
    assert "a" not in tombstones and "c" in tombstones  # past its ttl even before the next add


# -- the scheduler --------------------------------------------------------------------------------


class EndlessStream:
    """A request stream that always has more entries than asked for; records each read's count."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.acked: list[bytes] = []
        self._ids = itertools.count()

    async def ensure_group(self) -> None:
        pass

    async def pending(self, consumer: str) -> list:
        return []

    async def claim(self, consumer: str, min_idle_ms: int = 0) -> list:
        return []

    async def get(self, consumer: str, block_ms: int, count: int = 64) -> list[StreamEntry]:
        await asyncio.sleep(0)
        self.counts.append(count)
        return [self._entry(next(self._ids)) for _ in range(count)]

    async def ack(self, entry_id: bytes) -> None:
        self.acked.append(entry_id)

    @staticmethod
    def _entry(i: int) -> StreamEntry:
        return StreamEntry(f"{i}-0".encode(), pb.QueuedRequest(request_id=f"r{i}", prompt_token_ids=[1]))


def _scheduler(stream=None, max_queued: int = 4096, workers=()) -> SchedulerServer:
    config = SchedulerConfig("127.0.0.1", 0, "redis://unused", "s0", 2.0, 5.0, 60.0, max_queued=max_queued)
    server = SchedulerServer(config, stream=stream or EndlessStream(), redis=connect(UNUSED_REDIS))
    server.leading.set()  # the leader, as a lone scheduler is once it took over

    class Replies:
        published: list = []

        async def publish(self, channel, event) -> None:
            self.published.append(event)

    server.replies = Replies()
    for name, role in workers:
        info = spb.WorkerInfo(instance_id=name, role=role, token_budget=100, grpc_address=f"{name}:1",
                              kv_layout=layout_to_proto(LAYOUT), kv_transport=pb.KV_TRANSPORT_UCX)
        server.registry.register(info, pb.WorkerStats(num_free_blocks=10), now=0.0)
    return server


def test_the_scheduler_stops_reading_the_stream_at_max_queued_and_resumes_as_it_drains() -> None:
    async def scenario():
        server = _scheduler(max_queued=10)
        reading = asyncio.ensure_future(server.consume_forever())
        for _ in range(20):
            await asyncio.sleep(0)
        full = (len(server.queue), sum(server.stream.counts))
        for rid in list(server.queue)[:3]:
            await server.cancel(rid)  # the queue shrinks by three
        for _ in range(20):
            await asyncio.sleep(0)
        reading.cancel()
        return server, full

    server, (queued_when_full, read_when_full) = asyncio.run(scenario())
    assert queued_when_full == read_when_full == 10  # nothing more was read: it waits in Redis
    # Each read asks for no more than the room left: the queue never passes max_queued.
    assert len(server.queue) == 10 and sum(server.stream.counts) == 13 and max(server.stream.counts[1:]) <= 3
    assert max(server.stream.counts) <= 64


def _in_decode(server: SchedulerServer, rid: str, decode_id: str) -> Tracked:
    kv = kv_handle(10, request_id=rid, transport=pb.KV_TRANSPORT_UCX)
    done = spb.PrefillDoneRequest(request_id=rid, instance_id="p", kv=kv)
    tracked = Tracked(b"1-0", pb.QueuedRequest(request_id=rid, prompt_token_ids=[1] * 10), Stage.DECODE,
                      "p", decode_id, done)
    server.tracked[rid] = tracked
    server.registry.workers[decode_id].assigned[rid] = 10
    return tracked


def _exhausted() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, None, None, "waiting queue full")


def _record_decode_submits(monkeypatch) -> list[str]:
    """The decode servers the scheduler submits to from now on, by instance id (nothing is sent)."""
    submitted = []

    async def submit_decode(self, tracked, worker, submit, span):
        submitted.append(worker.instance_id)

    monkeypatch.setattr(SchedulerServer, "_submit_decode", submit_decode)
    return submitted


def test_a_full_decode_server_s_refusal_places_the_request_elsewhere_not_fails_it(monkeypatch) -> None:
    submitted = _record_decode_submits(monkeypatch)

    async def scenario():
        server = _scheduler(workers=[("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE),
                                     ("d-b", spb.WORKER_ROLE_DECODE)])
        tracked = _in_decode(server, "r1", "d-a")
        await server._rpc_failed(tracked, server.registry.workers["d-a"], _exhausted())
        await asyncio.sleep(0)
        return server, tracked

    server, tracked = asyncio.run(scenario())
    assert tracked.stage is Stage.DECODE and tracked.decode_id == "d-b" and submitted == ["d-b"]
    assert tracked.runs == 1 and not server.replies.published  # not failed, not counted as a run
    assert server.registry.workers["d-a"].full and server.registry.workers["d-a"].assigned == {}


def test_with_every_decode_server_full_the_request_waits_for_the_next_heartbeat(monkeypatch) -> None:
    submitted = _record_decode_submits(monkeypatch)

    async def scenario():
        server = _scheduler(workers=[("p", spb.WORKER_ROLE_PREFILL), ("d", spb.WORKER_ROLE_DECODE)])
        tracked = _in_decode(server, "r1", "d")
        await server._rpc_failed(tracked, server.registry.workers["d"], _exhausted())
        waiting = (tracked.stage, tracked.decode_id)
        server.registry.heartbeat("d", pb.WorkerStats(num_free_blocks=10), now=1.0)
        server._retry_awaiting_decode()  # what the heartbeat's wake-up runs
        await asyncio.sleep(0)
        return server, tracked, waiting

    server, tracked, waiting = asyncio.run(scenario())
    assert waiting == (Stage.AWAITING_DECODE, None)
    assert tracked.stage is Stage.DECODE and tracked.decode_id == "d" and submitted == ["d"]
    assert not server.replies.published


def test_a_message_too_large_for_grpc_fails_the_request_instead_of_bouncing_it(monkeypatch) -> None:
    monkeypatch.setattr(SchedulerServer, "_submit_decode", lambda *args: asyncio.sleep(0))

    async def scenario():
        server = _scheduler(workers=[("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE),
                                     ("d-b", spb.WORKER_ROLE_DECODE)])
        tracked = _in_decode(server, "r1", "d-a")
        too_large = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, None, None,
                                         "Sent message larger than max (20000000 vs. 16777216)")
        await server._rpc_failed(tracked, server.registry.workers["d-a"], too_large)
        return server

    server = asyncio.run(scenario())
    assert "r1" not in server.tracked and not server.registry.workers["d-a"].full
    (event,) = server.replies.published
    assert event.finish_reason == pb.FINISH_REASON_ERROR and "larger than max" in event.error


def test_a_submit_that_timed_out_stays_placed_and_runs_again_only_if_the_worker_never_took_it() -> None:
    """A Submit waits for the worker's current engine step, which can outlast the call's timeout: the
    worker may well have the request. Before, DEADLINE_EXCEEDED failed the request for good (its
    client got an error while the worker ran it); now it stays placed, and only when two heartbeats
    after the call do not list it does it run again."""
    async def scenario():
        server = _scheduler(workers=[("p", spb.WORKER_ROLE_PREFILL), ("q", spb.WORKER_ROLE_PREFILL)])
        for rid, worker in (("taken", "p"), ("lost", "q")):
            server.tracked[rid] = Tracked(b"1-0", pb.QueuedRequest(request_id=rid, prompt_token_ids=[1]),
                                          Stage.PREFILL, worker)
            server.registry.workers[worker].assigned[rid] = 1
            timed_out = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, None, None, "Deadline Exceeded")
            await server._rpc_failed(server.tracked[rid], server.registry.workers[worker], timed_out)
        placed = {rid: (t.stage, t.prefill_id) for rid, t in server.tracked.items()}
        for _ in range(2):
            server.heartbeat(server.registry.workers["p"], {"taken"})
            server.heartbeat(server.registry.workers["q"], set())
        return server, placed

    server, placed = asyncio.run(scenario())
    assert placed == {"taken": (Stage.PREFILL, "p"), "lost": (Stage.PREFILL, "q")}
    assert not server.replies.published  # nothing failed
    assert server.tracked["taken"].stage is Stage.PREFILL and server.tracked["taken"].prefill_id == "p"
    assert server.tracked["lost"].stage is Stage.QUEUED and server.tracked["lost"].runs == 2  # runs again


def test_an_overloaded_prefill_server_s_refusal_puts_the_request_back_at_the_head() -> None:
    async def scenario():
        server = _scheduler(workers=[("p", spb.WORKER_ROLE_PREFILL)])
        tracked = Tracked(b"1-0", pb.QueuedRequest(request_id="r1", prompt_token_ids=[1]), Stage.PREFILL, "p")
        server.tracked["r1"] = tracked
        server.tracked["r2"] = Tracked(b"2-0", pb.QueuedRequest(request_id="r2", prompt_token_ids=[1]))
        server.queue.append("r2")
        server.registry.workers["p"].assigned["r1"] = 1
        await server._rpc_failed(tracked, server.registry.workers["p"], _exhausted())
        return server, tracked

    server, tracked = asyncio.run(scenario())
    assert list(server.queue) == ["r1", "r2"] and tracked.stage is Stage.QUEUED and tracked.prefill_id is None
    assert tracked.runs == 1 and not server.replies.published
    assert server.registry.pick_prefill(1) is None  # full until its next heartbeat


def test_full_workers_are_placed_nothing_until_their_next_heartbeat() -> None:
    registry = Registry()
    for name, role in [("p", spb.WORKER_ROLE_PREFILL), ("d", spb.WORKER_ROLE_DECODE)]:
        info = spb.WorkerInfo(instance_id=name, role=role, token_budget=100,
                              kv_layout=layout_to_proto(LAYOUT), kv_transport=pb.KV_TRANSPORT_UCX)
        registry.register(info, pb.WorkerStats(num_free_blocks=10), now=0.0).full = True
    handle = kv_handle(10, transport=pb.KV_TRANSPORT_UCX)
    assert registry.pick_prefill(1) is None and registry.pick_decode(handle) is None
    for name in ("p", "d"):
        registry.heartbeat(name, pb.WorkerStats(num_free_blocks=10), now=1.0)
    assert registry.pick_prefill(1).instance_id == "p" and registry.pick_decode(handle).instance_id == "d"


def test_the_scheduler_keeps_a_bounded_number_of_worker_channels() -> None:
    async def scenario():
        server = _scheduler()
        server._channels.max_size = 8
        opened = []
        for i in range(50):  # workers with ever new addresses
            info = spb.WorkerInfo(instance_id=f"w{i}", role=spb.WORKER_ROLE_DECODE,
                                  grpc_address=f"127.0.0.1:{i + 1}")
            opened.append(server._channel(server.registry.register(info, pb.WorkerStats(), now=0.0)))
        num_cached = len(server._channels)
        await server._channels.close()
        return num_cached

    assert asyncio.run(scenario()) == 8


# -- channel and endpoint caches ------------------------------------------------------------------


def test_the_channel_cache_closes_the_least_recently_used_channel_past_its_bound() -> None:
    async def scenario():
        cache = ChannelCache(NO_AUTH, max_size=2)
        a, b = cache.get("127.0.0.1:1", "prefill"), cache.get("127.0.0.1:2", "prefill")
        assert cache.get("127.0.0.1:1", "prefill") is a  # a is now the most recently used
        cache.get("127.0.0.1:3", "prefill")
        kept = ("127.0.0.1:1" in cache, "127.0.0.1:2" in cache, len(cache))
        await asyncio.sleep(0.1)  # the evicted channel's close runs in the background
        with pytest.raises(grpc.aio.UsageError):  # b is closed
            await prefill_pb2_grpc.PrefillStub(b).Release(prefill_pb2.ReleaseRequest(), timeout=1)
        await cache.close()
        return kept

    assert asyncio.run(scenario()) == (True, False, 2)


def test_a_ucx_puller_keeps_idle_endpoints_to_a_bounded_number_of_peers() -> None:
    class Endpoint:
        closed = False

        def abort(self) -> None:
            self.closed = True

    puller = UcxKvPuller(max_idle_peers=3)
    endpoints = [Endpoint() for _ in range(10)]
    for i, ep in enumerate(endpoints):
        puller._checkin(f"10.0.0.{i}:1", ep)
    assert puller.num_idle_peers == 3
    assert [ep.closed for ep in endpoints] == [True] * 7 + [False] * 3


# -- KV handles and receive buffers ---------------------------------------------------------------


def test_a_handle_must_follow_from_its_tokens_and_the_receiver_s_layout() -> None:
    assert check_handle(kv_handle(17), LAYOUT) == 2 * LAYOUT.bytes_per_block
    other = KVLayout(num_layers=3, num_kv_heads=1, head_dim=8, block_size=16, dtype=torch.bfloat16)
    bad = [kv_handle(17, num_bytes=1 << 40), kv_handle(17, num_bytes=3 * LAYOUT.bytes_per_block),
           kv_handle(17, block_ids=[0]), kv_handle(0), kv_handle(17, other)]
    for handle in bad:
        with pytest.raises(InvalidKvHandle):
            check_handle(handle, LAYOUT)
    assert issubclass(InvalidKvHandle, KvPullError) and issubclass(InvalidKvHandle, ValueError)


@pytest.mark.parametrize("puller_class", [pytest.param(lambda **kw: GrpcKvPuller(NO_AUTH, **kw), id="grpc"),
                                          pytest.param(UcxKvPuller, id="ucx")])
def test_pullers_refuse_an_invalid_handle_before_connecting_or_allocating(puller_class) -> None:
    async def scenario():
        puller = puller_class(layout=LAYOUT, timeout_s=5.0)
        try:
            with pytest.raises(InvalidKvHandle):
                await puller.pull(kv_handle(17, num_bytes=1 << 50))  # would be a petabyte buffer
        finally:
            await puller.close()
        return puller

    puller = asyncio.run(scenario())
    assert not getattr(puller, "_acquired", False)  # UCX was never even started


class FakeCall:
    """A PullKv response stream."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for data in self._chunks:
            yield prefill_pb2.KvChunk(data=data)


@pytest.mark.parametrize("chunks", [[b"abcd", b"efgh", b"i"], [b"abcd", b""] + [b""] * 1000 + [b"efgh"]],
                         ids=["more bytes", "empty chunks"])
def test_a_peer_sending_more_than_the_handle_says_fails_the_pull(chunks) -> None:
    with pytest.raises(KvPullError):
        asyncio.run(_receive(FakeCall(chunks), "r1", 8))
    assert bytes(asyncio.run(_receive(FakeCall([b"abcd", b"efgh"]), "r1", 8))) == b"abcdefgh"


# -- the decode server's Submit -------------------------------------------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class Context:
    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def test_a_submit_of_a_request_id_still_busy_is_resource_exhausted_not_invalid() -> None:
    """RESOURCE_EXHAUSTED: the scheduler places the request again later or elsewhere (INVALID_ARGUMENT
    failed it for good, though the id frees when the worker's layered pass ends)."""
    from splitserve.engine.request import RequestIdBusy
    from splitserve.services.prefill.servicer import PrefillServicer

    async def submit(request, traceparent):
        raise RequestIdBusy("request id 'r1' was aborted part way through a layered pass")

    server = SimpleNamespace(fence=SimpleNamespace(check=lambda context: asyncio.sleep(0)), submit=submit)
    with pytest.raises(Aborted) as refused:
        asyncio.run(PrefillServicer(server, grpc_kv=None).Submit(pb.QueuedRequest(request_id="r1"), Context()))
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("outcome", ["refused", "taken"])
def test_a_submit_whose_caller_gave_up_is_untracked_if_the_engine_then_refuses_it(outcome) -> None:
    """The engine takes a request between two steps; the Submit's deadline may cancel the call first.
    The engine's later refusal must still untrack it: heartbeats listing it would keep the scheduler
    waiting for a request that never runs (it now keeps a timed-out Submit placed). Taken, it stays."""
    from splitserve.worker.common import add_to_engine

    async def scenario():
        release = asyncio.Event()

        async def call(fn):
            await release.wait()  # the current engine step
            if outcome == "refused":
                raise ValueError("prompt, output or stop_token_ids contain a token id outside the vocabulary")

        loop = SimpleNamespace(engine=None, call=call)
        tracked: dict = {}
        request = pb.QueuedRequest(request_id="r1", prompt_token_ids=[1, 2], sampling=pb.SamplingParams(
            max_tokens=4, top_p=1.0))
        submit = asyncio.create_task(add_to_engine(loop, tracked, request, "entry"))
        await asyncio.sleep(0.01)
        submit.cancel()  # the Submit's deadline
        await asyncio.gather(submit, return_exceptions=True)
        release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        return tracked

    assert asyncio.run(scenario()) == ({} if outcome == "refused" else {"r1": "entry"})


def _decode_server(max_waiting: int) -> DecodeServer:
    """A decode server around a stand-in engine: Submit checks and queues, nothing is admitted."""
    engine = SimpleNamespace(layout=LAYOUT, sequences={}, prefix_cache_stats=PrefixCacheStats(),
                             published_cache=lambda now=False: (0, []),
                             blocks=SimpleNamespace(num_blocks=8, num_free_blocks=8),
                             scheduler=SimpleNamespace(waiting=[], running=[], prefilling=[]))
    config = WorkerConfig(engine=SimpleNamespace(max_num_seqs=1), host="127.0.0.1", port=0, scheduler="",
                          redis_url=UNUSED_REDIS, kv_transport="grpc", instance_id="d",
                          heartbeat_interval_s=1.0, max_waiting=max_waiting)
    return DecodeServer(config, engine, connect(UNUSED_REDIS), puller=None)


def _decode_request(rid: str, handle_fields: dict | None = None) -> decode_pb2.DecodeRequest:
    num_tokens = 17
    request = pb.QueuedRequest(request_id=rid, prompt_token_ids=[1] * num_tokens,
                               sampling=pb.SamplingParams(max_tokens=4, top_p=1.0))
    kv = kv_handle(num_tokens, request_id=rid, **(handle_fields or {}))
    return decode_pb2.DecodeRequest(request=request, kv=kv, output_token_ids=[2])


async def _submit(servicer: DecodeServicer, request: decode_pb2.DecodeRequest) -> grpc.StatusCode:
    try:
        await servicer.Submit(request, Context())
    except Aborted as exc:
        return exc.code
    return grpc.StatusCode.OK


def test_the_decode_server_refuses_submits_past_max_waiting_with_resource_exhausted() -> None:
    async def scenario():
        server = _decode_server(max_waiting=2)
        servicer = DecodeServicer(server)
        codes = [await _submit(servicer, _decode_request(f"r{i}")) for i in range(3)]
        return server, codes

    server, codes = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert list(server.waiting) == ["r0", "r1"] and set(server.requests) == {"r0", "r1"}


def test_a_decode_request_resent_while_its_first_copy_is_refused_stays_queued() -> None:
    """The scheduler drops a request and sends it again (behind another) while the decode server's
    reserve() of the first copy runs and refuses it (ValueError). Before, the refusal failed the new
    copy and left its id in the queue without a request: the next admission raised KeyError, which
    ended the decode server."""
    async def scenario():
        server = _decode_server(max_waiting=4)
        engine = SimpleNamespace(abort=lambda rid: None)
        calls = []

        async def call(fn):
            calls.append(fn)
            if len(calls) == 1:  # r0's reserve, on the engine thread
                await server.drop("r0")
                await server.submit(_decode_request("r0"))
                raise ValueError("the request needs 99 KV blocks but the whole cache holds 8")
            return fn(engine)

        server.loop.call = call
        for rid in ("r0", "r1"):
            await server.submit(_decode_request(rid))
        resent_before = server.requests["r0"]
        admitted = await server._try_admit("r0")
        await server.background.wait()  # a failure the refusal started, if any, has run
        return admitted, server, resent_before

    admitted, server, first = asyncio.run(scenario())
    assert admitted and list(server.waiting) == ["r1", "r0"]
    assert set(server.waiting) <= set(server.requests)  # what admission reads for the head, later
    assert server.requests["r0"] is not first and server.requests["r0"].submit.request.request_id == "r0"


def test_the_decode_waiting_limit_defaults_to_four_batches() -> None:
    config = WorkerConfig(engine=SimpleNamespace(max_num_seqs=64), host="", port=0, scheduler="",
                          redis_url="", kv_transport="grpc", instance_id="d", heartbeat_interval_s=1.0)
    assert config.waiting_limit == 256


@pytest.mark.parametrize("handle_fields", [{"num_bytes": 1 << 40}, {"block_ids": [0]}, {"num_tokens": 5}],
                         ids=["num_bytes", "block_ids", "num_tokens"])
def test_the_decode_server_refuses_an_invalid_kv_handle_with_invalid_argument(handle_fields) -> None:
    async def scenario():
        server = _decode_server(max_waiting=2)
        code = await _submit(DecodeServicer(server), _decode_request("r1", handle_fields))
        return server, code

    server, code = asyncio.run(scenario())
    assert code is grpc.StatusCode.INVALID_ARGUMENT and not server.waiting and not server.requests


# -- gRPC servers ---------------------------------------------------------------------------------


def test_a_server_past_its_concurrent_rpcs_answers_resource_exhausted() -> None:
    async def scenario():
        server = make_server(NO_AUTH, max_concurrent_rpcs=1)
        port = bind(server, "127.0.0.1", 0, None)
        add_health(server)
        await server.start()
        channel = open_channel(f"127.0.0.1:{port}", NO_AUTH, "prefill")
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            watch = stub.Watch(health_pb2.HealthCheckRequest())
            await watch.read()  # a stream now holds the one slot
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            watch.cancel()
            return refused.value.code()
        finally:
            await channel.close()
            await server.stop(0)

    assert asyncio.run(scenario()) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_server_refuses_a_message_over_its_receive_limit() -> None:
    async def scenario():
        server = make_server(NO_AUTH, max_receive_bytes=1024)
        port = bind(server, "127.0.0.1", 0, None)
        add_health(server)
        await server.start()
        channel = open_channel(f"127.0.0.1:{port}", NO_AUTH, "prefill")
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status  # small: fine
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Check(health_pb2.HealthCheckRequest(service="x" * 2048), timeout=5)
            return refused.value.code()
        finally:
            await channel.close()
            await server.stop(0)

    assert asyncio.run(scenario()) is grpc.StatusCode.RESOURCE_EXHAUSTED


# -- the PullKv deadline --------------------------------------------------------------------------


def test_a_stalled_grpc_puller_is_cut_off_at_the_deadline_and_the_pin_closed() -> None:
    num_bytes = 64 << 20  # far more than gRPC's flow-control windows buffer for a reader that stops

    async def scenario():
        source = SyntheticKvSource({payload_id(num_bytes): make_payload(num_bytes)})
        kv = GrpcKvServer(timeout_s=0.5)
        await kv.start(source)
        server = make_server(NO_AUTH)
        port = bind(server, "127.0.0.1", 0, None)
        prefill_pb2_grpc.add_PrefillServicer_to_server(KvOnlyPrefillServicer(kv), server)
        await server.start()
        channel = open_channel(f"127.0.0.1:{port}", NO_AUTH, "prefill")
        try:
            call = prefill_pb2_grpc.PrefillStub(channel).PullKv(
                prefill_pb2.PullKvRequest(request_id=payload_id(num_bytes)), timeout=30)
            await call.read()  # one chunk, then it stops reading and holds the stream open
            for _ in range(100):
                if source.num_closes:
                    break
                await asyncio.sleep(0.05)
            pinned_after_deadline = source.num_opens - source.num_closes
            call.cancel()
            return pinned_after_deadline, source.num_opens
        finally:
            await channel.close()
            await server.stop(0)

    assert asyncio.run(scenario()) == (0, 1)
