"""The gateway process: wires Redis, the scheduler link, the frontend and both servers in one loop."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from splitserve.common.auth import NO_AUTH, warn_if_open
from splitserve.common.net import scheduler_addresses
from splitserve.common.rpc import (
    CLIENT_MAX_MESSAGE_BYTES,
    MAX_CONCURRENT_RPCS,
    NOT_SERVING,
    SERVING,
    add_health,
    bind,
    make_server,
    open_channel,
)
from splitserve.common.service import run_until_signal
from splitserve.common.tracing import NO_TRACER, Tracer, exporting
from splitserve.queue.streams import (
    CancelWriter,
    ProtoCodec,
    RedisClient,
    RequestStream,
    connect,
    redacted,
    reply_stream,
)
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import gateway_pb2_grpc, scheduler_pb2_grpc

from .cluster import ClusterSnapshot, ClusterView
from .config import GatewayConfig
from .frontend import Frontend, Services
from .grpc_api import GatewayServicer
from .http import build_app
from .metrics import GatewayMetrics
from .model import ServedModel
from .router import ReplyRouter

log = structlog.get_logger(__name__)
GRPC_SERVICE = "splitserve.v1.Gateway"
# A cancel waits this long for Redis, not the default minute: the handler of the request awaits it,
# and a request whose cancel is lost only runs to its end in the cluster.
CANCEL_RETRY_S = 5.0


async def serve(config: GatewayConfig) -> int:
    """Run until SIGINT/SIGTERM (0), or until the reply router or cluster poller fails (1)."""
    model = await asyncio.to_thread(ServedModel.load, config.model, config.served_model_name)
    redis = connect(config.redis_url, config.redis_credentials)
    warn_if_open(config.cluster_auth)
    channels = [open_channel(address, config.cluster_auth, "scheduler")
                for address in scheduler_addresses(config.scheduler)]
    try:
        async with exporting(config.otlp_endpoint, "gateway", config.gateway_id) as tracer:
            server = GatewayServer(config, model, redis, channels, tracer)
            await server.start()
            return await run_until_signal(server.tasks, server.shutdown)
    finally:
        for channel in channels:
            await channel.close()
        await redis.aclose()


class GatewayServer:
    """Both edges over one Frontend, plus the background reply router and cluster poller."""

    def __init__(self, config: GatewayConfig, model: ServedModel, redis: RedisClient,
                 channels: list[grpc.aio.Channel], tracer: Tracer = NO_TRACER) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.router = ReplyRouter(redis, reply_stream(config.gateway_id))
        # Room for every request --max-pending admits (plus health checks): past them the client
        # hears the gateway's own 429 / RESOURCE_EXHAUSTED message, not gRPC's.
        # The client edge: the API key guards it, not the cluster token.
        self.grpc_server = make_server(NO_AUTH, CLIENT_MAX_MESSAGE_BYTES,
                                       max(MAX_CONCURRENT_RPCS, 2 * config.max_pending))
        self.health = add_health(self.grpc_server)
        cluster = ClusterView([scheduler_pb2_grpc.SchedulerStub(c) for c in channels],
                              config.cluster_poll_interval_s, self._on_cluster_update)
        services = Services(model, cluster, self.router, RequestStream(redis, ProtoCodec(pb.QueuedRequest)),
                            CancelWriter(redis, CANCEL_RETRY_S), self.metrics, tracer)
        self.frontend = Frontend(config, services)
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(self.frontend, config.api_key),
                                                       self.grpc_server)
        # handler_cancellation: a client that disconnects cancels its handler at once, which cancels
        # the request upstream even while no token is due.
        app = build_app(self.frontend, self.metrics, config.api_key, config.max_body_bytes)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.tasks: list[asyncio.Task] = []

    async def _on_cluster_update(self, snapshot: ClusterSnapshot) -> None:
        if snapshot.state is not None:
            self.metrics.update_cluster(snapshot.state)
        await self._set_health(self.frontend.ready)

    async def _set_health(self, serving: bool) -> None:
        for service in ("", GRPC_SERVICE):
            await self.health.set(service, SERVING if serving else NOT_SERVING)

    async def start(self) -> None:
        """Start serving; Redis must answer now (later outages are ridden out, see router.py)."""
        try:
            await self.router.client.ping()
        except (RedisError, OSError) as exc:
            raise OSError(f"cannot reach Redis at {redacted(self.config.redis_url)}: {exc}") from None
        await self.router.open()  # before any request can be enqueued
        await self._set_health(False)
        ssl_context, credentials = edge_tls(self.config)
        grpc_port = bind(self.grpc_server, self.config.host, self.config.grpc_port, credentials)
        self.tasks = [asyncio.create_task(self.router.run(), name="reply-router"),
                      asyncio.create_task(self.frontend.services.cluster.run(), name="cluster-poller")]
        try:
            await self.grpc_server.start()
            await self.runner.setup()
            site = web.TCPSite(self.runner, self.config.host, self.config.http_port, ssl_context=ssl_context)
            await site.start()
        except BaseException:  # the HTTP port taken, say: stop what started, then say why
            try:
                await self._abandon_start()
            except Exception as exc:  # the start's own error is the one to tell
                log.warning("stopping a failed start failed", error=repr(exc))
            raise
        scheme = "https" if ssl_context else "http"
        log.info("gateway started", http=f"{scheme}://{self.config.host}:{self.runner.addresses[0][1]}",
                 grpc=f"{self.config.host}:{grpc_port}", tls=ssl_context is not None, model=self.frontend.model.name,
                 scheduler=self.config.scheduler, max_pending=self.config.max_pending)

    async def _abandon_start(self) -> None:
        """Undo a start that failed part way: left running, the gRPC server was torn down after the
        event loop had closed (a traceback and an un-awaited coroutine under the real error)."""
        for task in self.tasks:
            task.cancel()
        try:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            try:
                await self.grpc_server.stop(None)
            finally:
                await self.runner.cleanup()

    async def shutdown(self) -> None:
        """Drain first (new requests 503, in-flight ones finish or are aborted and cancelled
        upstream), then stop the servers; run_until_signal cancels the background tasks after."""
        await self._set_health(False)
        if self.tasks and not any(t.done() for t in self.tasks):
            await self.frontend.drain(self.config.shutdown_grace_s)
        await self.grpc_server.stop(grace=1.0)
        await self.runner.cleanup()


def edge_tls(config: GatewayConfig) -> tuple[ssl.SSLContext | None, grpc.ServerCredentials | None]:
    """The client edge's TLS, HTTP and gRPC, from --tls-cert/--tls-key (TLS 1.2 or newer); (None,
    None) without them. ValueError when the files do not load."""
    if not config.tls_cert:
        return None, None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(config.tls_cert, config.tls_key)
        cert, key = Path(config.tls_cert).read_bytes(), Path(config.tls_key).read_bytes()
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the gateway's TLS certificate {config.tls_cert} / key "
                         f"{config.tls_key}: {exc}") from None
    return context, grpc.ssl_server_credentials([(key, cert)])
