"""One subscription to this gateway's reply channel, fanned out to per-request queues."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from splitserve.queue.streams import ProtoCodec, RedisClient, Subscription
from splitserve.v1 import common_pb2 as pb

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GatewayAbort:
    """Put in a request's queue by the gateway itself (not the cluster): end the request now."""

    reason: str


Reply = pb.TokenEvent | GatewayAbort


class ReplyRouter:
    """Routes the TokenEvents published on one channel to the queue of their request.

    A request registers its queue before it is enqueued, so no event can arrive for it unseen;
    events for requests that are gone (finished, cancelled) are dropped. Through a Redis outage the
    queues stay; once Redis is back the channel is subscribed again and events reach them again
    (workers publish again what no one received meanwhile).
    """

    def __init__(self, client: RedisClient, channel: str) -> None:
        self.client, self.channel = client, channel
        self._queues: dict[str, asyncio.Queue[Reply]] = {}
        self._subscription = Subscription(client, channel, ProtoCodec(pb.TokenEvent))

    @property
    def connected(self) -> bool:
        """Whether Redis was reachable when last tried (false from a failure until it answers again)."""
        return self.client.link.up

    async def subscribe(self) -> None:
        """Subscribe and wait for Redis to confirm, so events published from now on are received."""
        await self._subscription.open()

    async def run(self) -> None:
        """Route events until cancelled (call subscribe() first)."""
        try:
            async for event in self._subscription:
                self._route(event)
        finally:
            await self._subscription.close()

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
