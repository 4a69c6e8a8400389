"""Typed wrappers over the Redis request stream and pub/sub channels, with the codec injected.

Keys and channels:
- ``splitserve:requests``: the request stream. Gateways XADD, schedulers read it through the
  consumer group ``schedulers``. An entry stays in the group's pending list until the scheduler
  acknowledges it (finished or failed for good), so a scheduler that dies loses nothing: its
  successor re-reads the pending entries. Acknowledged entries are deleted at once, which keeps the
  stream short without ``MAXLEN`` (which in Redis 7 would also trim entries still pending).
- ``splitserve:cancel``: pub/sub channel of cancelled request ids (the gateway publishes when a
  client goes away; the scheduler and workers drop the request).
- ``splitserve:reply:<gateway id>``: pub/sub channel per gateway on which workers publish the
  TokenEvents of the requests that gateway owns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import redis.asyncio as aioredis
import structlog
from google.protobuf.message import DecodeError, Message

log = structlog.get_logger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)

REQUEST_STREAM = "splitserve:requests"
SCHEDULER_GROUP = "schedulers"
CANCEL_CHANNEL = "splitserve:cancel"
FIELD = b"msg"


def reply_channel(gateway_id: str) -> str:
    return f"splitserve:reply:{gateway_id}"


class Codec(Protocol[T]):
    def encode(self, message: T) -> bytes: ...

    def decode(self, payload: bytes) -> T: ...


class ProtoCodec(Generic[M]):
    """Serializes one protobuf message type."""

    def __init__(self, message_type: type[M]) -> None:
        self.message_type = message_type

    def encode(self, message: M) -> bytes:
        return message.SerializeToString()

    def decode(self, payload: bytes) -> M:
        return self.message_type.FromString(payload)


class TextCodec:
    """Plain UTF-8 strings (request ids on the cancel channel)."""

    def encode(self, message: str) -> bytes:
        return message.encode()

    def decode(self, payload: bytes) -> str:
        return payload.decode()


def connect(url: str) -> aioredis.Redis:
    """A client for url (redis://host:port/db), bytes in and out.

    No socket timeout: stream reads and pub/sub subscriptions block on purpose (redis-py 8 would
    otherwise cut every read at 5 s); a dead server still shows up through the health checks.
    """
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=10,
                                   socket_timeout=None, socket_keepalive=True)


@dataclass(frozen=True)
class StreamEntry(Generic[T]):
    entry_id: bytes
    message: T


class RequestStream(Generic[T]):
    """The request stream: producers put, consumers in one group get, ack, or re-read pending."""

    def __init__(self, client: aioredis.Redis, codec: Codec[T], key: str = REQUEST_STREAM,
                 group: str = SCHEDULER_GROUP) -> None:
        self.client, self.codec, self.key, self.group = client, codec, key, group

    async def put(self, message: T) -> bytes:
        return await self.client.xadd(self.key, {FIELD: self.codec.encode(message)})

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def get(self, consumer: str, block_ms: int, count: int = 64) -> list[StreamEntry[T]]:
        """New entries for this consumer, waiting up to block_ms for the first."""
        reply = await self.client.xreadgroup(self.group, consumer, {self.key: ">"}, count=count, block=block_ms)
        return await self._entries(reply)

    async def pending(self, consumer: str) -> list[StreamEntry[T]]:
        """Entries delivered to this consumer before and never acknowledged (a restart's backlog)."""
        reply = await self.client.xreadgroup(self.group, consumer, {self.key: "0"}, count=100_000)
        return await self._entries(reply)

    async def claim_idle(self, consumer: str, min_idle_ms: int) -> list[StreamEntry[T]]:
        """Take over entries another consumer has held unacknowledged for min_idle_ms."""
        _, claimed, *_ = await self.client.xautoclaim(self.key, self.group, consumer, min_idle_ms,
                                                       start_id="0-0", count=1000)
        return await self._decode_all(claimed)

    async def ack(self, entry_id: bytes) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(self.key, self.group, entry_id)
            pipe.xdel(self.key, entry_id)
            await pipe.execute()

    async def _entries(self, reply) -> list[StreamEntry[T]]:
        if not reply:
            return []
        (_, items), = reply
        return await self._decode_all(items)

    async def _decode_all(self, items) -> list[StreamEntry[T]]:
        """Decoded entries; one that cannot be decoded is logged and dropped, or it would come
        back after every restart and stop the consumer each time."""
        entries = []
        for entry_id, fields in items:
            if not fields:  # a deleted pending entry reads as None
                continue
            try:
                entries.append(StreamEntry(entry_id, self.codec.decode(fields[FIELD])))
            except (KeyError, ValueError, DecodeError) as exc:
                log.error("malformed stream entry dropped", entry_id=entry_id.decode(), error=repr(exc))
                await self.ack(entry_id)
        return entries


class PubSub(Generic[T]):
    """Typed publish/subscribe on Redis channels."""

    def __init__(self, client: aioredis.Redis, codec: Codec[T]) -> None:
        self.client, self.codec = client, codec

    async def publish(self, channel: str, message: T) -> None:
        await self.client.publish(channel, self.codec.encode(message))

    async def publish_many(self, messages: list[tuple[str, T]]) -> None:
        """Publish several messages in one round trip (a decode step's tokens)."""
        if not messages:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for channel, message in messages:
                pipe.publish(channel, self.codec.encode(message))
            await pipe.execute()

    async def subscribe(self, channel: str) -> AsyncIterator[T]:
        """Messages on channel from now on, until the caller stops iterating."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)
        try:
            while True:
                item = await pubsub.get_message(timeout=None)
                if item is not None and item["type"] == "message":
                    yield self.codec.decode(item["data"])
        finally:
            await pubsub.aclose()


async def listen_for_cancels(client: aioredis.Redis, on_cancel) -> None:
    """Await on_cancel(request_id) for every id published on the cancel channel, forever."""
    async for request_id in PubSub(client, TextCodec()).subscribe(CANCEL_CHANNEL):
        await on_cancel(request_id)
