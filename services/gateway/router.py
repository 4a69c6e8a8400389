"""This gateway's reply stream, read in one place and fanned out to per-request queues."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from splitserve.common.logging import describe
from splitserve.queue.streams import ProtoCodec, RedisClient, ReplyReader
from splitserve.v1 import common_pb2 as pb

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GatewayAbort:
    """Put in a request's queue by the gateway itself (not the cluster): end the request now."""

    reason: str


Reply = pb.TokenEvent | GatewayAbort


class ReplyRouter:
    """Routes the TokenEvents appended to one reply stream to the queue of their request.

    A request registers its queue before it is enqueued, so no event can arrive for it unseen;
    events for requests that are gone (finished, cancelled) are dropped. Through a Redis outage the
    queues stay; once Redis is back the stream is read on from the last entry seen, so nothing
    appended meanwhile is missed.
    """

    def __init__(self, client: RedisClient, stream: str) -> None:
        self.client, self.stream = client, stream
        self._queues: dict[str, asyncio.Queue[Reply]] = {}
        self._reader = ReplyReader(client, stream, ProtoCodec(pb.TokenEvent))

    @property
    def connected(self) -> bool:
        """Whether Redis was reachable when last tried (false from a failure until it answers again)."""
        return self.client.link.up

    async def open(self) -> None:
        """Create the stream: events appended from now on are read."""
        await self._reader.open()

    async def run(self) -> None:
        """Route events until cancelled (call open() first), keeping the stream alive meanwhile;
        the stream is deleted at the end. Either side's failure ends it with that error: a stream
        left to expire would lose every reply while the gateway looked ready."""
        keeper = asyncio.create_task(self._reader.keep_forever(), name="reply-stream-keeper")
        reader = asyncio.create_task(self._read(), name="reply-stream-reader")
        try:
            done, _ = await asyncio.wait((keeper, reader), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RuntimeError("the reply stream's reader or keeper ended")  # both run forever
        finally:
            for task in (keeper, reader):
                task.cancel()
            await asyncio.gather(keeper, reader, return_exceptions=True)
            await asyncio.shield(self._close())

    async def _read(self) -> None:
        async for event in self._reader:
            self._route(event)

    async def _close(self) -> None:
        try:
            await self._reader.close()
        except Exception as exc:  # Redis gone: the stream expires by itself
            log.warning("reply stream not deleted", stream=self.stream, error=describe(exc))

    def register(self, request_id: str) -> asyncio.Queue[Reply]:
        if request_id in self._queues:
            raise KeyError(request_id)
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def abort_all(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put_nowait(GatewayAbort(reason))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._queues

    def _route(self, event: pb.TokenEvent) -> None:
        queue = self._queues.get(event.request_id)
        if queue is None:
            log.debug("event for an unknown request", request_id=event.request_id)
            return
        queue.put_nowait(event)
