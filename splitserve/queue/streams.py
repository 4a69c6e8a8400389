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

A Redis restart or short outage is ridden out (reconnect.py): reads and subscriptions wait for Redis
as long as it takes and re-subscribe, results (publishes, acknowledgements) wait up to
PUBLISH_RETRY_S, and only `put` fails at once, so the gateway can answer its client.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import redis.asyncio as aioredis
import structlog
from google.protobuf.message import DecodeError, Message
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from splitserve.common.auth import RedisCredentials

from .reconnect import RedisLink

log = structlog.get_logger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)

REQUEST_STREAM = "splitserve:requests"
SCHEDULER_GROUP = "schedulers"
CANCEL_CHANNEL = "splitserve:cancel"
FIELD = b"msg"
PUBLISH_RETRY_S = 60.0  # how long a publish or an acknowledgement waits for Redis before it raises
# A reconnect to an address that no longer answers (a container restarted under a new IP) would
# otherwise hang in connect() for ~20 s per attempt before the retry resolves the name again.
CONNECT_TIMEOUT_S = 2.0
# After Redis comes back, subscribers re-subscribe within a retry delay or two: until then a message
# no one received is published again (a token is delayed, not lost).
RESUBSCRIBE_GRACE_S = 5.0


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


class RedisClient(aioredis.Redis):
    """redis-py's asyncio client plus `link`: whether Redis is reachable, as the wrappers on this
    client (all of one process's) see it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.link = RedisLink()


def redacted(url: str) -> str:
    """url for a log line: a password in it (redis://user:PASSWORD@host, ?password=) becomes ***."""
    if "password=" in url:
        url = re.sub(r"([?&]password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}{slash}{tail}"


def connect(url: str, credentials: RedisCredentials = RedisCredentials()) -> RedisClient:
    """A client for url (redis://host:port/db, or rediss:// for TLS: ?ssl_ca_certs=PATH names the
    CA), authenticated with credentials (a password in the URL wins), bytes in and out.

    No socket timeout: stream reads and pub/sub subscriptions block on purpose (redis-py 8 would
    otherwise cut every read at 5 s); a dead server still shows up through the health checks.
    No redis-py retries: they would resend an XADD whose reply was lost (queueing the request
    twice); the wrappers below retry as each command allows (reconnect.py). No maintenance
    notifications (a managed-Redis feature): while they are on ("auto"), the pool skips its check
    that a pooled connection is still open, and the first command after a Redis restart fails on
    a connection the old server closed.
    """
    return RedisClient.from_url(url, username=credentials.username, password=credentials.password,
                                decode_responses=False, health_check_interval=10,
                                socket_timeout=None, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_keepalive=True,
                                retry=Retry(NoBackoff(), 0),
                                maint_notifications_config=MaintNotificationsConfig(enabled=False))


@dataclass(frozen=True)
class StreamEntry(Generic[T]):
    entry_id: bytes
    message: T


class RequestStream(Generic[T]):
    """The request stream: producers put, consumers in one group get, ack, or re-read pending.

    Everything but `put` waits out a Redis outage; a consumer group lost with Redis's data is
    created again.
    """

    def __init__(self, client: RedisClient, codec: Codec[T], key: str = REQUEST_STREAM,
                 group: str = SCHEDULER_GROUP) -> None:
        self.client, self.codec, self.key, self.group = client, codec, key, group
        self.link = client.link
        self._acking: set[bytes] = set()  # acknowledgements waiting for Redis: done, not to re-read

    async def put(self, message: T) -> bytes:
        """Add message, once: a retry after a lost reply could queue it twice, and the client is
        better told now (the gateway answers 503) than kept waiting for Redis."""
        return await self.client.xadd(self.key, {FIELD: self.codec.encode(message)})

    async def ensure_group(self) -> None:
        await self.link.call(self._create_group)

    async def get(self, consumer: str, block_ms: int, count: int = 64) -> list[StreamEntry[T]]:
        """New entries for this consumer, waiting up to block_ms for the first (and for Redis).

        After an outage it returns every entry pending for this consumer but those whose
        acknowledgement is on its way: a read whose reply was lost with the connection still
        delivered its entries. The caller skips those it holds.
        """
        num_outages = self.link.num_outages
        reply = await self._read_group(lambda: self.client.xreadgroup(
            self.group, consumer, {self.key: ">"}, count=count, block=block_ms))
        if self.link.num_outages != num_outages:
            return [e for e in await self.pending(consumer) if e.entry_id not in self._acking]
        return await self._entries(reply)

    async def pending(self, consumer: str) -> list[StreamEntry[T]]:
        """Entries delivered to this consumer before and never acknowledged (a restart's backlog)."""
        reply = await self._read_group(lambda: self.client.xreadgroup(
            self.group, consumer, {self.key: "0"}, count=100_000))
        return await self._entries(reply)

    async def claim_idle(self, consumer: str, min_idle_ms: int) -> list[StreamEntry[T]]:
        """Take over entries another consumer has held unacknowledged for min_idle_ms."""
        _, claimed, *_ = await self._read_group(lambda: self.client.xautoclaim(
            self.key, self.group, consumer, min_idle_ms, start_id="0-0", count=1000))
        return await self._decode_all(claimed)

    async def ack(self, entry_id: bytes) -> None:
        self._acking.add(entry_id)
        try:
            await self.link.call(lambda: self._ack(entry_id), PUBLISH_RETRY_S)
        finally:
            self._acking.discard(entry_id)

    async def _ack(self, entry_id: bytes) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(self.key, self.group, entry_id)
            pipe.xdel(self.key, entry_id)
            await pipe.execute()

    async def _create_group(self) -> None:
        try:
            await self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_group(self, read: Callable[[], Awaitable]):
        """read() through outages; a group Redis no longer has (its data lost) is created again."""
        async def read_or_recreate():
            try:
                return await read()
            except aioredis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
            log.error("the consumer group is gone (Redis lost its data?): created again; requests "
                      "queued before may be lost", stream=self.key, group=self.group)
            await self._create_group()
            return await read()
        return await self.link.call(read_or_recreate)

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
    """Typed publish/subscribe on Redis channels.

    A publish waits for Redis up to retry_s (then raises), and right after an outage publishes again
    what no one received while subscribers re-subscribe (RESUBSCRIBE_GRACE_S): subscribers must
    drop duplicates (the gateway drops token positions it has; a cancel is idempotent).
    """

    def __init__(self, client: RedisClient, codec: Codec[T], retry_s: float = PUBLISH_RETRY_S) -> None:
        self.client, self.codec, self.retry_s = client, codec, retry_s
        self.link = client.link

    async def publish(self, channel: str, message: T) -> None:
        await self.publish_many([(channel, message)])

    async def publish_many(self, messages: list[tuple[str, T]]) -> None:
        """Publish several messages in one round trip (a decode step's tokens), in order."""
        payloads = [(channel, self.codec.encode(message)) for channel, message in messages]
        while payloads:
            receivers = await self.link.call(functools.partial(self._publish, payloads), self.retry_s)
            if 0 not in receivers or not self.link.reconnected_within(RESUBSCRIBE_GRACE_S):
                return
            payloads = payloads[receivers.index(0):]  # from the first unheard one on, keeping order
            await asyncio.sleep(0.1)  # a subscriber's retry delay is at least this long

    async def _publish(self, payloads: list[tuple[str, bytes]]) -> list[int]:
        async with self.client.pipeline(transaction=False) as pipe:
            for channel, payload in payloads:
                pipe.publish(channel, payload)
            return await pipe.execute()

    async def subscribe(self, channel: str) -> AsyncIterator[T]:
        """Messages on channel from now on, until the caller stops iterating."""
        subscription = Subscription(self.client, channel, self.codec)
        try:
            await subscription.open()
            async for message in subscription:
                yield message
        finally:
            await subscription.close()


class Subscription(Generic[T]):
    """One channel's messages, decoded. Through a Redis outage it waits; redis-py re-subscribes
    the channel when it reconnects, and messages published after that arrive again."""

    def __init__(self, client: RedisClient, channel: str, codec: Codec[T]) -> None:
        self.channel, self.codec = channel, codec
        self.link = client.link
        self._pubsub = client.pubsub()

    async def open(self) -> None:
        """Subscribe and wait for Redis to confirm: messages published from now on are received."""
        await self.link.call(lambda: self._pubsub.subscribe(self.channel))
        while True:
            message = await self.link.call(lambda: self._pubsub.get_message(timeout=None))
            if message is not None and message["type"] == "subscribe":
                return

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            # Any answer (the re-subscription's confirmation first) means Redis is back.
            message = await self.link.call(lambda: self._pubsub.get_message(timeout=None))
            if message is not None and message["type"] == "message":
                yield self.codec.decode(message["data"])

    async def close(self) -> None:
        await self._pubsub.aclose()


async def listen_for_cancels(client: RedisClient, on_cancel) -> None:
    """Await on_cancel(request_id) for every id published on the cancel channel, forever (Redis
    outages included)."""
    async for request_id in PubSub(client, TextCodec()).subscribe(CANCEL_CHANNEL):
        await on_cancel(request_id)
