"""gRPC plumbing shared by every service: message limits, servers, channels, health."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.common.auth import ClusterAuth

# gRPC refuses messages over 4 MiB by default. The largest internal message is a Decode.Submit of a
# long prompt (a 128k-token prompt is under 1 MiB of token ids) or a 1 MiB PullKv chunk: 16 MiB
# leaves room, and bounds what one message from a peer can make a server buffer.
MAX_MESSAGE_BYTES = 16 << 20
# What a client of the gateway may send in one message: a prompt, as text or token ids, of the
# longest context is well under 1 MiB.
CLIENT_MAX_MESSAGE_BYTES = 8 << 20
# RPCs a server handles at once; past it gRPC itself answers RESOURCE_EXHAUSTED. Streams (PullKv,
# the gateway's Generate) count for as long as they run.
MAX_CONCURRENT_RPCS = 1024
# Cached channels to peers (one per address); the least recently used is closed past it.
MAX_CACHED_CHANNELS = 256
CHANNEL_CLOSE_GRACE_S = 30.0  # an evicted channel's RPCs in flight get this long to finish
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
]


def make_server(auth: ClusterAuth, max_receive_bytes: int = MAX_MESSAGE_BYTES,
                max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS) -> grpc.aio.Server:
    """A server that refuses calls without auth's cluster token (UNAUTHENTICATED; none asked when
    auth has none), messages over max_receive_bytes and RPCs past max_concurrent_rpcs at once (both
    RESOURCE_EXHAUSTED, from gRPC itself)."""
    options = [(k, max_receive_bytes if k == "grpc.max_receive_message_length" else v) for k, v in OPTIONS]
    return grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs,
                           interceptors=auth.server_interceptors())


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Bind host:port (port 0 picks a free one) with credentials (TLS; None: plaintext, said
    explicitly so that no internal server is plaintext by accident); returns the port bound."""
    address = f"{host}:{port}"
    try:  # grpc raises RuntimeError ("set GRPC_VERBOSITY=debug"): a traceback with no reason, uncaught
        return (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError as exc:
        raise OSError(f"cannot bind the gRPC server to {address}: the port is in use or privileged, or the "
                      f"address is not this machine's") from exc


def open_channel(address: str, auth: ClusterAuth, server_role: str) -> grpc.aio.Channel:
    """A channel whose every call carries auth's cluster token (if it has one), over mutual TLS
    when auth has certificates, the server's certificate checked for server_role (certs.ROLES)."""
    credentials = auth.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=OPTIONS, interceptors=auth.client_interceptors())
    return grpc.aio.secure_channel(address, credentials, options=OPTIONS + auth.channel_options(server_role),
                                   interceptors=auth.client_interceptors())


def open_blocking_channel(address: str, auth: ClusterAuth, server_role: str) -> grpc.Channel:
    """A blocking (non-aio) channel for tools, over mutual TLS when auth has certificates (the
    server checked for server_role); calls pass metadata=auth.metadata for the token."""
    credentials = auth.channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=OPTIONS)
    return grpc.secure_channel(address, credentials, options=OPTIONS + auth.channel_options(server_role))


class ChannelCache:
    """One channel per peer address, at most max_size of them, least recently used closed first.

    Addresses come from peers (worker registrations, KV handles): without the bound a stream of
    made-up addresses would grow the cache, and its open channels, forever.
    """

    def __init__(self, auth: ClusterAuth, max_size: int = MAX_CACHED_CHANNELS) -> None:
        self.auth, self.max_size = auth, max_size
        self._channels: OrderedDict[tuple[str, str], grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str, server_role: str) -> grpc.aio.Channel:
        """The channel to the server of server_role at address, opened on first use; may close the
        least recently used one."""
        key = (address, server_role)
        channel = self._channels.get(key)
        if channel is not None:
            self._channels.move_to_end(key)
            return channel
        while len(self._channels) >= self.max_size:
            self._close_later(self._channels.popitem(last=False)[1])
        channel = self._channels[key] = open_channel(address, self.auth, server_role)
        return channel

    def drop(self, address: str) -> None:
        """Close and forget the channels to address (its peer is gone), if any."""
        for key in [key for key in self._channels if key[0] == address]:
            self._close_later(self._channels.pop(key))

    def __len__(self) -> int:
        return len(self._channels)

    def __contains__(self, address: str) -> bool:
        return any(key[0] == address for key in self._channels)

    async def close(self) -> None:
        """Close every channel, waiting for those evicted before."""
        channels, self._channels = list(self._channels.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in channels), *self._closing, return_exceptions=True)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        # RPCs in flight on it (a pull, a Release) get a grace period rather than a cut.
        task = asyncio.ensure_future(channel.close(CHANNEL_CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """The standard grpc.health.v1 service; the caller flips it to SERVING when ready."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
