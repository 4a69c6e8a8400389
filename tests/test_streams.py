"""The request, cancel and reply stream wrappers against a real (private) redis-server, restarts included."""

import asyncio
import time

import pytest
from redis import exceptions as redis_exceptions
from structlog.testing import capture_logs

from splitserve.queue.redis_server import LocalRedis
from splitserve.queue import streams
from splitserve.queue.streams import (
    REQUEST_STREAM,
    ProtoCodec,
    ReplyReader,
    ReplyWriter,
    RequestStream,
    TextCodec,
    connect,
)
from splitserve.v1 import common_pb2 as pb


def test_entries_stay_pending_until_acked_and_garbage_is_dropped():
    async def scenario(url):
        client = connect(url)
        stream = RequestStream(client, ProtoCodec(pb.QueuedRequest))
        await stream.ensure_group()
        await client.xadd(REQUEST_STREAM, {b"msg": b"\xff not a protobuf"})
        await stream.put(pb.QueuedRequest(request_id="r1", prompt_token_ids=[1, 2]))
        got = await stream.get("c0", block_ms=100)
        pending = await stream.pending("c0")  # what a restarted consumer re-reads
        await stream.ack(got[0].entry_id)
        after = await stream.pending("c0"), await client.xlen(REQUEST_STREAM)
        await client.aclose()
        return got, pending, after

    with LocalRedis() as redis:
        got, pending, (left, length) = asyncio.run(scenario(redis.url))
    assert [e.message.request_id for e in got] == ["r1"]
    assert [e.message.request_id for e in pending] == ["r1"]
    assert left == [] and length == 0  # acknowledged entries are deleted; the garbage too


# -- riding out a Redis outage ---------------------------------------------------------------------


def _request(request_id: str) -> pb.QueuedRequest:
    return pb.QueuedRequest(request_id=request_id, prompt_token_ids=[1, 2])


async def _until(condition, timeout_s: float = 10.0) -> None:
    """Poll state that a Redis server in another process changes (nothing to await)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _forward(reader: ReplyReader, into: asyncio.Queue) -> None:
    async for message in reader:
        into.put_nowait(message)


@pytest.mark.timeout(60)
def test_a_request_reader_and_a_reply_reader_ride_out_a_restart_and_nothing_is_lost():
    async def scenario(redis: LocalRedis):
        client, worker = connect(redis.url), connect(redis.url)
        stream = RequestStream(client, ProtoCodec(pb.QueuedRequest))
        await stream.ensure_group()
        await stream.put(_request("r1"))
        assert [e.message.request_id for e in await stream.get("c0", block_ms=100)] == ["r1"]  # now pending
        reader, received = ReplyReader(client, "replies:gw", TextCodec()), asyncio.Queue()
        await reader.open()
        writer = ReplyWriter(worker, TextCodec())
        listener = asyncio.create_task(_forward(reader, received))
        await writer.publish("replies:gw", "before")
        assert await asyncio.wait_for(received.get(), 5) == "before"
        reading = asyncio.create_task(stream.get("c0", block_ms=60_000))  # blocked when Redis goes
        await asyncio.sleep(0.2)

        await asyncio.to_thread(redis.terminate)
        await _until(lambda: not client.link.up)
        started = time.monotonic()
        with pytest.raises(redis_exceptions.ConnectionError):
            await stream.put(_request("refused"))  # not retried: the gateway answers 503
        put_s = time.monotonic() - started
        during = asyncio.create_task(writer.publish_many([("replies:gw", "during 1"), ("replies:gw", "during 2")]))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis.start)
        await during
        # Appended while the reader was still reconnecting: read all the same, in order.
        await writer.publish("replies:gw", "after")
        got = [await asyncio.wait_for(received.get(), 10) for _ in range(3)]
        await stream.put(_request("r2"))
        read = await asyncio.wait_for(reading, 10)
        listener.cancel()
        await client.aclose()
        await worker.aclose()
        return put_s, got, [e.message.request_id for e in read]

    with LocalRedis(appendonly=True) as redis, capture_logs() as logs:
        put_s, got, read = asyncio.run(scenario(redis))
    assert put_s < 1.0
    assert got == ["during 1", "during 2", "after"]
    assert read == ["r1", "r2"]  # the read after an outage returns what is pending: r1 survived in the AOF
    events = [e["event"] for e in logs]
    assert events.count("redis reconnected") == 2  # once per client


@pytest.mark.timeout(30)
def test_an_append_gives_up_after_its_bound():
    async def scenario(url: str) -> float:
        client = connect(url)
        started = time.monotonic()
        with pytest.raises(redis_exceptions.ConnectionError):
            await ReplyWriter(client, TextCodec(), retry_s=0.5).publish("replies:gw", "lost")
        await client.aclose()
        return time.monotonic() - started

    redis = LocalRedis().start()
    redis.stop()
    with capture_logs() as logs:
        elapsed = asyncio.run(scenario(redis.url))
    assert 0.5 <= elapsed < 3.0
    assert [e["event"] for e in logs] == ["redis unreachable, retrying", "redis still unreachable, giving up"]


def test_a_reply_stream_starts_after_a_previous_process_s_entries_expires_and_is_trimmed_as_read():
    async def scenario(url: str):
        client = connect(url)
        writer = ReplyWriter(client, TextCodec())
        await writer.publish("replies:gone", "to a gateway that never opened its stream")
        absent = await client.exists("replies:gone")
        first = ReplyReader(client, "replies:gw", TextCodec())
        await first.open()
        await writer.publish("replies:gw", "for the first process")
        second, received = ReplyReader(client, "replies:gw", TextCodec()), asyncio.Queue()
        await second.open()  # a restart under the same gateway id
        listener = asyncio.create_task(_forward(second, received))
        await writer.publish("replies:gw", "one")
        await writer.publish("replies:gw", "two")
        got = [await asyncio.wait_for(received.get(), 5) for _ in range(2)]
        ttl = await client.ttl("replies:gw")
        await second._keep()  # what keep_forever does every few seconds
        left = [fields for _, fields in await client.xrange("replies:gw")]
        await client.delete("replies:gw")  # Redis lost its data
        await second._keep()
        recreated = await client.exists("replies:gw")
        listener.cancel()
        await second.close()
        closed = await client.exists("replies:gw")
        await client.aclose()
        return absent, got, ttl, left, recreated, closed

    with LocalRedis() as redis, capture_logs() as logs:
        absent, got, ttl, left, recreated, closed = asyncio.run(scenario(redis.url))
    assert not absent  # appends never create a stream
    assert got == ["one", "two"]
    assert 0 < ttl <= streams.REPLY_TTL_S
    assert left == [{streams.FIELD: b"two"}]  # what was read is trimmed, up to the last entry
    assert recreated and not closed
    assert any("reply stream is gone" in e["event"] for e in logs)


def test_a_reply_stream_refused_a_renewal_is_renewed_once_redis_takes_writes_and_given_up_on_after_its_bound(
        monkeypatch):
    """Redis answering the keeper's EXPIRE with an error (here NOREPLICAS) must not end the keeping
    for good (before, the keeper died at the first one and the stream expired under a gateway that
    looked ready); past REPLY_RENEW_LIMIT_S without renewal the keeper raises, for its owner."""
    monkeypatch.setattr(streams, "REPLY_KEEP_S", 0.05)
    monkeypatch.setattr(streams, "REPLY_RENEW_LIMIT_S", 1.0)

    async def scenario(url: str):
        client = connect(url)
        reader = ReplyReader(client, "replies:gw", TextCodec())
        await reader.open()
        await client.expire("replies:gw", 50)
        await client.config_set("min-replicas-to-write", 1)  # every write refused: NOREPLICAS
        keeper = asyncio.create_task(reader.keep_forever())
        await asyncio.sleep(0.5)
        refused = keeper.done(), await client.ttl("replies:gw")
        await client.config_set("min-replicas-to-write", 0)
        deadline = time.monotonic() + 5
        while await client.ttl("replies:gw") <= 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        renewed = await client.ttl("replies:gw")
        await client.config_set("min-replicas-to-write", 1)
        started = time.monotonic()
        error = await asyncio.wait_for(asyncio.gather(keeper, return_exceptions=True), 10)
        waited = time.monotonic() - started
        await client.config_set("min-replicas-to-write", 0)
        await client.aclose()
        return refused, renewed, error[0], waited

    with LocalRedis() as redis, capture_logs() as logs:
        (done, ttl), renewed, error, waited = asyncio.run(scenario(redis.url))
    assert not done and ttl <= 50  # refused, not renewed, still keeping
    assert renewed > 50  # renewed once Redis took writes again
    assert isinstance(error, redis_exceptions.ResponseError) and "NOREPLICAS" in str(error)
    assert 0.9 <= waited < 5
    events = [e["event"] for e in logs]
    assert "the reply stream was not renewed; trying again" in events
    assert events[-1] == "the reply stream could not be renewed; giving up"


def test_the_reply_router_ends_with_its_keeper_s_error(monkeypatch):
    """A keeper that gave up ends the gateway's router (and so the gateway, exit 1, which `up`
    restarts) instead of dying alone while the router reads a stream about to expire."""
    from splitserve.services.gateway.router import ReplyRouter

    monkeypatch.setattr(streams, "REPLY_KEEP_S", 0.05)
    monkeypatch.setattr(streams, "REPLY_RENEW_LIMIT_S", 0.3)

    async def scenario(url: str):
        client = connect(url)
        router = ReplyRouter(client, "replies:gw")
        await router.open()
        await client.config_set("min-replicas-to-write", 1)
        try:
            return (await asyncio.wait_for(asyncio.gather(router.run(), return_exceptions=True), 10))[0]
        finally:
            await client.config_set("min-replicas-to-write", 0)
            await client.aclose()

    with LocalRedis() as redis:
        error = asyncio.run(scenario(redis.url))
    assert isinstance(error, redis_exceptions.ResponseError) and "NOREPLICAS" in str(error)


def test_a_batch_of_replies_is_one_entry_per_stream_read_in_order_and_a_malformed_one_is_dropped():
    async def scenario(url: str):
        client = connect(url)
        readers = {key: ReplyReader(client, key, TextCodec()) for key in ("replies:a", "replies:b")}
        received = {key: asyncio.Queue() for key in readers}
        for reader in readers.values():
            await reader.open()
        listeners = [asyncio.create_task(_forward(r, received[k])) for k, r in readers.items()]
        writer = ReplyWriter(client, TextCodec())
        await writer.publish_many([("replies:a", "1"), ("replies:b", "x"), ("replies:a", "2"), ("replies:a", "3")])
        lengths = [await client.xlen(key) for key in readers]  # the opening marker, then the batch
        got = {k: [await asyncio.wait_for(q.get(), 5) for _ in range(n)] for (k, q), n in zip(received.items(), (3, 1))}
        many = [f"m{i}" for i in range(streams.MAX_BATCH + 1)]
        await writer.publish_many([("replies:a", m) for m in many])
        got_many = [await asyncio.wait_for(received["replies:a"].get(), 5) for _ in many]
        split = await client.xlen("replies:a")
        await client.xadd("replies:a", {streams.BATCH_FIELD: streams.pack_batch([b"lost", b"cut"])[:-1]})
        await client.xadd("replies:a", {streams.BATCH_FIELD: streams.pack_batch([b"y"] * (streams.MAX_BATCH + 1))})
        await writer.publish("replies:a", "after")
        after = await asyncio.wait_for(received["replies:a"].get(), 5)
        for listener in listeners:
            listener.cancel()
        await client.aclose()
        return lengths, got, got_many, split, after

    with LocalRedis() as redis, capture_logs() as logs:
        lengths, got, got_many, split, after = asyncio.run(scenario(redis.url))
    assert lengths == [2, 2]
    assert got == {"replies:a": ["1", "2", "3"], "replies:b": ["x"]}
    assert got_many == [f"m{i}" for i in range(streams.MAX_BATCH + 1)]
    assert split == 4  # MAX_BATCH + 1 messages took two entries
    assert after == "after"  # the cut and the oversized batch were dropped, and reading went on
    dropped = [e for e in logs if e["event"] == "malformed reply batch dropped"]
    assert [e["error"] for e in dropped] == ["a batch cut short in a message",
                                             f"a batch of more than {streams.MAX_BATCH} messages"]


def test_a_consumer_group_lost_with_the_data_is_created_again():
    async def scenario(url: str):
        client = connect(url)
        stream = RequestStream(client, ProtoCodec(pb.QueuedRequest))
        await stream.ensure_group()
        await stream.put(_request("r1"))
        await stream.get("c0", block_ms=100)
        await client.flushall()  # what a restart without persistence leaves
        await stream.put(_request("r2"))
        read = await stream.get("c0", block_ms=100)
        await client.aclose()
        return [e.message.request_id for e in read]

    with LocalRedis() as redis, capture_logs() as logs:
        read = asyncio.run(scenario(redis.url))
    assert read == ["r2"]  # r1 was lost with the data; what came after is read
    assert any(e["log_level"] == "error" and "consumer group is gone" in e["event"] for e in logs)


def test_the_first_put_after_a_restart_is_queued():
    async def scenario(redis: LocalRedis) -> int:
        client = connect(redis.url)
        stream = RequestStream(client, ProtoCodec(pb.QueuedRequest))
        await stream.put(_request("before"))
        await asyncio.to_thread(redis.restart)
        await stream.put(_request("after"))  # on a fresh connection, not the pooled one the restart closed
        length = await client.xlen(REQUEST_STREAM)
        await client.aclose()
        return length

    with LocalRedis(appendonly=True) as redis:
        assert asyncio.run(scenario(redis)) == 2
