"""Typed wrappers over the Redis streams, with the codec injected.

Keys:
- ``splitserve:requests``: the request stream. Gateways XADD, schedulers read it through the
  consumer group ``schedulers``. An entry stays in the group's pending list until the scheduler
  acknowledges it (finished or failed for good), so a scheduler that dies loses nothing: its
  successor claims the pending entries. Acknowledged entries are deleted at once, which keeps the
  stream short without ``MAXLEN`` (which in Redis 7 would also trim entries still pending).
- ``splitserve:cancels``: the ids of requests a gateway cancels (its client went away, a stop string
  ended it), read by the scheduler through the same group; the scheduler aborts each request on
  the workers it placed it on.
- ``splitserve:replies:<gateway id>``: one stream per gateway, on which workers (and the scheduler,
  for a failure) append the TokenEvents of the requests that gateway owns. The gateway reads it
  from the last entry it saw, so a reconnect resumes exactly where it stopped; every token event
  carries its position, so a gap is seen, never silently skipped.

A Redis restart or short outage is ridden out (reconnect.py): reads wait for Redis as long as it
takes, results (replies, acknowledgements) wait up to PUBLISH_RETRY_S, and only `put` fails at once,
so the gateway can answer its client.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import redis.asyncio as aioredis
import structlog
from google.protobuf.message import DecodeError, Message
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from splitserve.common.auth import RedisCredentials
from splitserve.common.logging import describe

from .reconnect import RedisLink

log = structlog.get_logger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)

REQUEST_STREAM = "splitserve:requests"
SCHEDULER_GROUP = "schedulers"
CANCEL_STREAM = "splitserve:cancels"
FIELD = b"msg"
# Several messages for one stream in one entry (ReplyWriter.publish_many): each a 4-byte
# little-endian length, then its bytes. One entry per step and gateway instead of one per token
# spares Redis, the writer and the reader most of their per-entry work.
BATCH_FIELD = b"msgs"
MAX_BATCH = 256  # messages per batch entry, at most: a longer list is split, a reader drops a longer entry
REPLY_READ_ENTRIES = 64  # entries a gateway reads from its reply stream at a time
PUBLISH_RETRY_S = 60.0  # how long a publish or an acknowledgement waits for Redis before it raises
# A reconnect to an address that no longer answers (a container restarted under a new IP) would
# otherwise hang in connect() for ~20 s per attempt before the retry resolves the name again.
CONNECT_TIMEOUT_S = 2.0
# A reply stream holds at most about this many entries, far above any backlog (its gateway trims what
# it read every REPLY_KEEP_S): bounded even if its gateway stops reading. An entry holds up to
# MAX_BATCH messages, but workers write only for the gateway's requests in flight (at most its
# --max-pending, each at most its max_tokens), which bounds a stopped gateway's stream first.
REPLY_MAXLEN = 100_000
REPLY_TTL_S = 300  # a reply stream whose gateway stopped renewing it (died) expires this long after
REPLY_KEEP_S = 10.0
# A reply stream Redis refused to renew (a write refused: NOREPLICAS, MISCONF, OOM) for this long
# ends its reader with the error rather than let the stream expire under a reader that looks well.
REPLY_RENEW_LIMIT_S = REPLY_TTL_S / 2
CANCEL_MAXLEN = 100_000  # cancels not yet read by a scheduler, at most (about)


def reply_stream(gateway_id: str) -> str:
    return f"splitserve:replies:{gateway_id}"


def pack_batch(payloads: list[bytes]) -> bytes:
    """Payloads as one BATCH_FIELD value."""
    return b"".join(len(p).to_bytes(4, "little") + p for p in payloads)


def entry_payloads(fields: dict[bytes, bytes]) -> list[bytes]:
    """The messages of a reply stream entry, in order: one, a batch, or none (the opening marker)."""
    if FIELD in fields:
        return [fields[FIELD]]
    return unpack_batch(fields[BATCH_FIELD]) if BATCH_FIELD in fields else []


def unpack_batch(value: bytes) -> list[bytes]:
    """The payloads of a BATCH_FIELD value; ValueError if it is cut short or holds more than MAX_BATCH."""
    view, payloads, at = memoryview(value), [], 0
    while at < len(view):
        if len(payloads) == MAX_BATCH:
            raise ValueError(f"a batch of more than {MAX_BATCH} messages")
        if at + 4 > len(view):
            raise ValueError("a batch cut short in a length")
        size = int.from_bytes(view[at:at + 4], "little")
        at += 4
        if at + size > len(view):
            raise ValueError("a batch cut short in a message")
        payloads.append(bytes(view[at:at + size]))
        at += size
    return payloads


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
    """Plain UTF-8 strings (request ids on the cancel stream)."""

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

    async def claim(self, consumer: str, min_idle_ms: int = 0) -> list[StreamEntry[T]]:
        """Take over every entry of the group left unacknowledged min_idle_ms or longer, whoever
        holds it (0: all of them, what a leader taking over does)."""
        entries, start = [], "0-0"
        while True:
            cursor, claimed, *_ = await self._read_group(lambda: self.client.xautoclaim(
                self.key, self.group, consumer, min_idle_ms, start_id=start, count=1000))
            entries += await self._decode_all(claimed)
            if cursor in (b"0-0", "0-0"):
                return entries
            start = cursor

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


class ReplyWriter(Generic[T]):
    """Appends messages to gateways' reply streams, in order, one round trip per batch and one
    entry per stream (up to MAX_BATCH messages each).

    An append waits for Redis up to retry_s (then raises). A retry after a reply lost with the
    connection may append a message twice: readers drop what they have (token positions). Appends
    never create a stream (NOMKSTREAM): a stream its gateway no longer keeps (it exited, or its key
    expired) takes nothing.
    """

    def __init__(self, client: RedisClient, codec: Codec[T], retry_s: float = PUBLISH_RETRY_S) -> None:
        self.client, self.codec, self.retry_s = client, codec, retry_s
        self.link = client.link

    async def publish(self, stream: str, message: T) -> None:
        await self.publish_many([(stream, message)])

    async def publish_many(self, messages: list[tuple[str, T]]) -> None:
        payloads = [(stream, self.codec.encode(message)) for stream, message in messages]
        if payloads:
            await self.link.call(functools.partial(self._append, payloads), self.retry_s)

    async def _append(self, payloads: list[tuple[str, bytes]]) -> None:
        by_stream: dict[str, list[bytes]] = {}
        for stream, payload in payloads:
            by_stream.setdefault(stream, []).append(payload)
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, messages in by_stream.items():
                for at in range(0, len(messages), MAX_BATCH):
                    part = messages[at:at + MAX_BATCH]
                    fields = {FIELD: part[0]} if len(part) == 1 else {BATCH_FIELD: pack_batch(part)}
                    pipe.xadd(stream, fields, maxlen=REPLY_MAXLEN, approximate=True, nomkstream=True)
            await pipe.execute()


class ReplyReader(Generic[T]):
    """One gateway's reply stream, read in order from the last entry seen: through a Redis outage it
    waits, and resumes exactly where it stopped (with the append-only file, nothing is lost).

    open() creates the stream; keep_forever() keeps it alive (an expiry a dead gateway's stream runs
    out on, renewed while this one runs) and trims what was read; close() deletes it.
    """

    def __init__(self, client: RedisClient, key: str, codec: Codec[T]) -> None:
        self.client, self.key, self.codec = client, key, codec
        self.link = client.link
        self.last_id = b"0-0"

    async def open(self) -> None:
        """Create the stream (if new) and start after its last entry: earlier ones are a previous
        process's."""
        self.last_id = await self.link.call(self._create)

    async def _create(self) -> bytes:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.key, {b"open": b"1"}, maxlen=REPLY_MAXLEN, approximate=True)
            pipe.expire(self.key, REPLY_TTL_S)
            marker, _ = await pipe.execute()
        return marker

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            # At most REPLY_READ_ENTRIES entries (of up to MAX_BATCH messages) are routed between
            # two reads, without the event loop running anything else.
            reply = await self.link.call(lambda: self.client.xread({self.key: self.last_id},
                                                                   count=REPLY_READ_ENTRIES, block=5000))
            for _, items in reply or ():
                for entry_id, fields in items:
                    self.last_id = entry_id
                    for payload in self._payloads(entry_id, fields):  # none in the opening marker
                        message = self._decode(entry_id, payload)
                        if message is not None:
                            yield message

    def _payloads(self, entry_id: bytes, fields: dict[bytes, bytes]) -> list[bytes]:
        try:
            return entry_payloads(fields)
        except ValueError as exc:
            log.error("malformed reply batch dropped", stream=self.key, entry_id=entry_id.decode(), error=str(exc))
            return []

    def _decode(self, entry_id: bytes, payload: bytes) -> T | None:
        try:
            return self.codec.decode(payload)
        except (ValueError, DecodeError) as exc:
            log.error("malformed reply dropped", stream=self.key, entry_id=entry_id.decode(), error=repr(exc))
            return None

    async def keep_forever(self) -> None:
        """Every REPLY_KEEP_S: renew the expiry, trim the entries read, and create the stream again if
        Redis lost it (its data gone): replies appended meanwhile are lost, which readers see as a gap.

        Redis unreachable is waited out (`link.call`); an error it answers is logged and tried again
        at the next tick, and raised once the stream has gone REPLY_RENEW_LIMIT_S without renewal."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(REPLY_KEEP_S)
            try:
                await self.link.call(self._keep)
            except RedisError as exc:
                unrenewed_s = time.monotonic() - renewed
                if unrenewed_s >= REPLY_RENEW_LIMIT_S:
                    log.error("the reply stream could not be renewed; giving up", stream=self.key,
                              unrenewed_s=round(unrenewed_s, 1), error=describe(exc))
                    raise
                log.error("the reply stream was not renewed; trying again", stream=self.key,
                          unrenewed_s=round(unrenewed_s, 1), error=describe(exc))
                continue
            renewed = time.monotonic()

    async def _keep(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.expire(self.key, REPLY_TTL_S)
            pipe.xtrim(self.key, minid=self.last_id, approximate=False)
            renewed, _ = await pipe.execute()
        if not renewed:
            log.error("the reply stream is gone (Redis lost its data?): created again; replies sent "
                      "meanwhile are lost", stream=self.key)
            await self._create()

    async def close(self) -> None:
        await self.client.delete(self.key)


class CancelWriter:
    """The gateway's side of the cancel stream: the ids of requests whose clients went away (or whose
    stop string ended them), for the scheduler, which aborts them where it placed them."""

    def __init__(self, client: RedisClient, retry_s: float) -> None:
        self.client, self.retry_s = client, retry_s
        self.link = client.link

    async def cancel(self, request_id: str) -> None:
        """Append request_id, waiting for Redis up to retry_s; a second copy (a retry) is harmless."""
        await self.link.call(lambda: self.client.xadd(
            CANCEL_STREAM, {FIELD: request_id.encode()}, maxlen=CANCEL_MAXLEN, approximate=True), self.retry_s)
