"""The request stream and pub/sub wrappers against a real (private) redis-server, restarts included."""

import asyncio
import time

import pytest
from redis import exceptions as redis_exceptions
from structlog.testing import capture_logs

from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import (
    REQUEST_STREAM,
    ProtoCodec,
    PubSub,
    RequestStream,
    Subscription,
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


async def _forward(subscription: Subscription, into: asyncio.Queue) -> None:
    async for message in subscription:
        into.put_nowait(message)


@pytest.mark.timeout(60)
def test_a_reader_and_a_subscriber_ride_out_a_restart_and_the_data_survives():
    async def scenario(redis: LocalRedis):
        client = connect(redis.url)
        stream = RequestStream(client, ProtoCodec(pb.QueuedRequest))
        await stream.ensure_group()
        await stream.put(_request("r1"))
        assert [e.message.request_id for e in await stream.get("c0", block_ms=100)] == ["r1"]  # now pending
        subscription, received = Subscription(client, "ch", TextCodec()), asyncio.Queue()
        await subscription.open()
        listener = asyncio.create_task(_forward(subscription, received))
        reading = asyncio.create_task(stream.get("c0", block_ms=60_000))  # blocked when Redis goes
        await asyncio.sleep(0.2)

        await asyncio.to_thread(redis.terminate)
        await _until(lambda: not client.link.up)
        started = time.monotonic()
        with pytest.raises(redis_exceptions.ConnectionError):
            await stream.put(_request("refused"))  # not retried: the gateway answers 503
        put_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis.start)

        await PubSub(client, TextCodec()).publish("ch", "after the restart")
        after = await asyncio.wait_for(received.get(), 10)
        await stream.put(_request("r2"))
        read = await asyncio.wait_for(reading, 10)
        listener.cancel()
        await subscription.close()
        await client.aclose()
        return put_s, after, [e.message.request_id for e in read]

    with LocalRedis(appendonly=True) as redis, capture_logs() as logs:
        put_s, after, read = asyncio.run(scenario(redis))
    assert put_s < 1.0
    assert after == "after the restart"
    assert read == ["r1", "r2"]  # the read after an outage returns what is pending: r1 survived in the AOF
    events = [e["event"] for e in logs]
    assert events.count("redis unreachable, retrying") == 1 and events.count("redis reconnected") == 1


@pytest.mark.timeout(30)
def test_a_publish_gives_up_after_its_bound():
    async def scenario(url: str) -> float:
        client = connect(url)
        started = time.monotonic()
        with pytest.raises(redis_exceptions.ConnectionError):
            await PubSub(client, TextCodec(), retry_s=0.5).publish("ch", "lost")
        await client.aclose()
        return time.monotonic() - started

    redis = LocalRedis().start()
    redis.stop()
    with capture_logs() as logs:
        elapsed = asyncio.run(scenario(redis.url))
    assert 0.5 <= elapsed < 3.0
    assert [e["event"] for e in logs] == ["redis unreachable, retrying", "redis still unreachable, giving up"]


@pytest.mark.timeout(30)
def test_right_after_an_outage_an_unheard_message_is_published_again_until_heard():
    async def scenario(url: str):
        publisher, subscriber = connect(url), connect(url)
        pubsub = PubSub(publisher, TextCodec())
        started = time.monotonic()
        await pubsub.publish("ch", "nobody listens")  # no outage: a message no one hears is gone
        unheard_s = time.monotonic() - started

        publisher.link.lost(OSError("cut"))
        publisher.link.restored()  # as if Redis just came back: the subscriber is still re-subscribing
        subscription, received = Subscription(subscriber, "ch", TextCodec()), asyncio.Queue()

        async def subscribe_late():
            await asyncio.sleep(0.5)
            await subscription.open()
            await _forward(subscription, received)

        late = asyncio.create_task(subscribe_late())
        await pubsub.publish_many([("ch", "first"), ("ch", "second")])
        got = [await asyncio.wait_for(received.get(), 5) for _ in range(2)]
        late.cancel()
        await subscription.close()
        await publisher.aclose()
        await subscriber.aclose()
        return unheard_s, got

    with LocalRedis() as redis:
        unheard_s, got = asyncio.run(scenario(redis.url))
    assert unheard_s < 0.5
    assert got == ["first", "second"]  # in order


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
