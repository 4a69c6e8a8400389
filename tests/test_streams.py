"""The request stream against a real (private) redis-server."""

import asyncio

from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import REQUEST_STREAM, ProtoCodec, RequestStream, connect
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
