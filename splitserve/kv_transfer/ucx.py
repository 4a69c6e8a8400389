"""The UCX transport: the decode server pulls over a ucxx endpoint to the prefill server's listener
and receives the payload straight from the pinned KV blocks (no copy on the sending side).

One pull on an endpoint, in order (UCX tag messages on one endpoint arrive in order):

    puller                                   server
    request (fixed size) ------------------>  KvSource.open(request_id, capability, first_block)
             <------------------------------  header: status, payload size (struct "<QQ")
             <------------------------------  payload (when found), sent from the pin itself
    ack (8 bytes) ------------------------->  KvSource.close(request_id); wait for the next one

The request is a fixed-size message (request id and capability, each with its length, and the
first block to send), so the server receives it into a buffer of its own size: a peer cannot make
it allocate more (ucxx's send_obj/recv_obj would allocate whatever size the peer announces). A
wrong capability gets the DENIED header and no payload, a first block the request does not hold
the INVALID one.

The ack exists because ucxx's Endpoint.close() aborts the connection: a server that closed right
after its send completed cut the payload off in flight on TCP (measured: connection reset).

Endpoints are reused: the puller keeps a few idle endpoints per prefill server and takes one per
pull, opening another when all are busy. Opening one costs ~12 ms here (UCX wire-up plus ucxx's
peer-info exchange), which was a third of a 1k-token pull; a pool rather than one endpoint and a
lock per peer keeps concurrent pulls from one prefill server concurrent. An endpoint whose pull
failed midway is closed, never reused, since its stream may stop mid-message.

Transports: UCX picks them. Endpoints keep UCX's peer error handling on, so a prefill server that
dies mid-pull raises here instead of aborting the decode process; UCX then leaves out its
shared-memory transports (cma, posix, sysv), so two processes on one host talk over TCP loopback
(measured: ~1-2 GB/s here; the same pull over cma with error handling off ran at ~3.5 GB/s).
RDMA needs a system UCX built with it (the PyPI wheels carry none).

`ucxx` is imported only inside functions here: UCX must not be initialized in a process that forks
afterwards, so importing this module is safe anywhere and workers start as fresh processes.
"""

from __future__ import annotations

import asyncio
import enum
import os
import struct
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import structlog

from splitserve.kv_transfer.base import (
    InvalidKvHandle,
    KvPermissionDenied,
    KvPuller,
    KvPullError,
    KvServer,
    KvSource,
    check_handle,
    pull_size,
)
from splitserve.v1 import common_pb2 as pb

if TYPE_CHECKING:
    from splitserve.engine.kv_cache import KVLayout

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT_S = 60.0
MAX_IDLE_ENDPOINTS_PER_PEER = 4
# Prefill servers a puller keeps idle endpoints to; the least recently used one's are closed past it
# (addresses come from handles: made-up ones must not grow the pool forever).
MAX_IDLE_PEERS = 256
# Endpoints a server serves at once; one more is closed at once (its puller's pull fails and the
# request is handed back). Each decode server keeps a few idle ones, plus one per pull in flight.
MAX_SERVER_ENDPOINTS = 1024
# A new endpoint must send its first pull request within this long, or it is closed: the listener
# takes connections from anyone who reaches it (ucxx binds every interface), and one that says
# nothing must not hold one of the MAX_SERVER_ENDPOINTS slots. A puller sends at once on connecting.
FIRST_REQUEST_TIMEOUT_S = 10.0
_ACK = np.ones(1, dtype=np.uint64)
# Defaults that UCX_* environment variables override (set TX and RX together: UCX refuses RX < TX).
# 256 KiB TCP segments (UCX's default is 64 KiB) cut 10-25% off 1k- and 4k-token pulls over TCP here;
# other transports ignore them.
UCX_OPTIONS = {"TCP_TX_SEG_SIZE": "256k", "TCP_RX_SEG_SIZE": "256k"}
# ucxx's progress thread waits on UCX's epoll fd with a 1 ms timeout: 1,000 wake-ups a second that
# preempt the engine thread on a worker's pinned core (measured: a 256-token prefill took 405 ms
# instead of 342). It wakes at once on any UCX event, so a longer timeout only spaces out the idle
# wake-ups. (ucxx's "blocking" mode, progress from the event loop, was slower still: 690 ms.)
PROGRESS_EPOLL_TIMEOUT_MS = 100


def _quiet_progress_thread() -> None:
    """Make ucxx start its progress thread with PROGRESS_EPOLL_TIMEOUT_MS (it hard-codes 1 ms).

    This reaches into ucxx's private modules; if a release moves them, UCX still works, with the
    1 ms wake-ups.
    """
    try:
        from ucxx._lib_async import application_context, continuous_ucx_progress

        base = continuous_ucx_progress.ThreadMode
        _ = (continuous_ucx_progress.ProgressTask, continuous_ucx_progress._create_context,
             application_context.ThreadMode)
    except (ImportError, AttributeError) as exc:
        log.warning("ucx progress thread left at its 1 ms epoll timeout", reason=str(exc))
        return

    class QuietThreadMode(base):
        def __init__(self, worker, event_loop, polling_mode=False):
            continuous_ucx_progress.ProgressTask.__init__(self, worker, event_loop)
            worker.set_progress_thread_start_callback(continuous_ucx_progress._create_context)
            worker.start_progress_thread(polling_mode=polling_mode, epoll_timeout=PROGRESS_EPOLL_TIMEOUT_MS)
            weakref.finalize(self, worker.stop_progress_thread)

    application_context.ThreadMode = QuietThreadMode


class _UcxRuntime:
    """The process's one UCX context, shared by every UCX transport object in the process.

    ucxx keeps a single context per process, so this is process state by nature. It is created on
    first use inside the running event loop and reset when the last user releases it, because
    (1) with Python futures enabled ucxx runs a notifier thread that is not a daemon: a process that
    never stops it cannot exit; (2) the context resolves its futures on the loop it was created in.
    Python futures are enabled because without them every pending ucxx receive spins the event
    loop (asyncio.sleep(0) polling): measured, one idle endpoint held a full core.
    """

    def __init__(self) -> None:
        self._num_users = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def acquire(self):
        """The ucxx module, initialized for the running event loop."""
        # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and warns about at every start.
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        import ucxx

        loop = asyncio.get_running_loop()
        if self._num_users == 0:
            _quiet_progress_thread()
            ucxx.init(UCX_OPTIONS, env_takes_precedence=True, progress_mode="thread",
                      enable_python_future=True)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("UCX is in use by another event loop of this process")
        self._num_users += 1
        return ucxx

    def release(self) -> None:
        self._num_users -= 1
        if self._num_users > 0:
            return
        import ucxx

        self._loop = None
        try:
            ucxx.reset()  # stops the notifier thread first, even when it then finds live endpoints
        except ucxx.exceptions.UCXError as exc:
            log.warning("ucx_reset_incomplete", error=str(exc))


_RUNTIME = _UcxRuntime()


def _ucx_errors() -> tuple[type[BaseException], ...]:
    """What a broken pull raises: any ucxx error (peer gone, refused), or a timeout."""
    import ucxx

    return (ucxx.exceptions.UCXError, TimeoutError)


class _Status(enum.IntEnum):
    FOUND = 1
    NOT_FOUND = 2
    DENIED = 3
    INVALID = 4  # a first block past the request's blocks


@dataclass(frozen=True)
class _PullRequest:
    """What a puller asks for: one request's payload, with the request's KV capability."""

    request_id: str
    capability: str
    first_block: int = 0

    MAX_ID_BYTES = 256
    MAX_CAPABILITY_BYTES = 128
    _FORMAT = struct.Struct(f"<HHI{MAX_ID_BYTES}s{MAX_CAPABILITY_BYTES}s")
    SIZE = _FORMAT.size

    def encode(self) -> bytearray:
        rid, cap = self.request_id.encode(), self.capability.encode()
        if len(rid) > self.MAX_ID_BYTES or len(cap) > self.MAX_CAPABILITY_BYTES:
            raise KvPullError(f"request id or capability too long for a UCX pull: {self.request_id[:64]!r}")
        return bytearray(self._FORMAT.pack(len(rid), len(cap), self.first_block, rid, cap))

    @classmethod
    def decode(cls, raw) -> _PullRequest | None:
        """None for a malformed request (lengths past the fields, bytes that are not UTF-8)."""
        id_len, cap_len, first_block, rid, cap = cls._FORMAT.unpack(bytes(raw))
        if id_len > cls.MAX_ID_BYTES or cap_len > cls.MAX_CAPABILITY_BYTES:
            return None
        try:
            return cls(rid[:id_len].decode(), cap[:cap_len].decode(), first_block)
        except UnicodeDecodeError:
            return None


@dataclass(frozen=True)
class _Header:
    """The server's reply to a request id, sent before the payload."""

    status: _Status
    num_bytes: int

    _FORMAT = struct.Struct("<QQ")

    def encode(self) -> bytearray:
        return bytearray(self._FORMAT.pack(self.status, self.num_bytes))

    @classmethod
    def decode(cls, raw: bytes | bytearray) -> _Header:
        status, num_bytes = cls._FORMAT.unpack(raw)
        return cls(_Status(status), num_bytes)

    @classmethod
    def empty(cls) -> bytearray:
        return bytearray(cls._FORMAT.size)


def split_address(address: str) -> tuple[str, int]:
    """"host:port" -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


class UcxKvServer(KvServer):
    """A ucxx listener serving payloads from a KvSource.

    host is the name decode servers dial (UCX listens on every interface); port 0 picks a free one.
    A pull that takes longer than timeout_s is dropped, so a stalled peer cannot pin blocks forever;
    past max_endpoints endpoints at once, a new one is closed as it arrives.
    """

    transport = pb.KV_TRANSPORT_UCX

    def __init__(self, host: str, port: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_endpoints: int = MAX_SERVER_ENDPOINTS,
                 first_request_timeout_s: float = FIRST_REQUEST_TIMEOUT_S) -> None:
        self._host = host
        self._port = port
        self._timeout_s = timeout_s
        self._max_endpoints = max_endpoints
        self._first_request_timeout_s = first_request_timeout_s
        self._source: KvSource | None = None
        self._listener = None
        self._handlers: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("UcxKvServer.address: start() it first")
        return f"{self._host}:{self._listener.port}"

    async def start(self, source: KvSource) -> None:
        ucxx = _RUNTIME.acquire()
        self._source = source
        self._listener = ucxx.create_listener(self._handle, port=self._port)
        log.info("ucx_kv_server_started", address=self.address)

    async def stop(self) -> None:
        """Stop listening and drop every endpoint; pulls in flight fail (their pins are closed)."""
        if self._listener is None:
            return
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        # Dropped only now: ucxx warns when a listener is collected while its handlers still run.
        listener, self._listener = self._listener, None
        listener.close()
        _RUNTIME.release()

    async def _handle(self, ep) -> None:
        """Serve pulls on one endpoint until the puller closes it; never raises into ucxx."""
        if len(self._handlers) >= self._max_endpoints:
            log.warning("ucx_kv_endpoint_refused", num_endpoints=len(self._handlers))
            ep.abort()
            return
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            # A denied, unknown or malformed request ends the endpoint: guessing costs a new connection
            # each time, and only a connection whose every pull was served stays open.
            try:
                async with asyncio.timeout(self._first_request_timeout_s):
                    request = await _next_request(ep)
            except TimeoutError:
                log.warning("ucx_kv_endpoint_silent", timeout_s=self._first_request_timeout_s)
                return
            while request is not None:
                async with asyncio.timeout(self._timeout_s):
                    if not await self._serve_one(ep, request):
                        break
                request = await _next_request(ep)
        except _ucx_errors() as exc:
            log.warning("ucx_kv_pull_failed", error=repr(exc))
        finally:
            self._handlers.discard(task)
            ep.abort()

    async def _serve_one(self, ep, request: _PullRequest) -> bool:
        """One pull; False when it was denied or its request is not held (the endpoint is then
        closed: the puller never reuses an endpoint after either)."""
        request_id = request.request_id
        try:
            payload = await self._source.open(request_id, request.capability, request.first_block)
        except KvPermissionDenied:
            log.warning("ucx_kv_pull_denied", request_id=request_id[:64])
            await ep.send(_Header(_Status.DENIED, 0).encode())
            return False
        except InvalidKvHandle:
            await ep.send(_Header(_Status.INVALID, 0).encode())
            return False
        if payload is None:
            await ep.send(_Header(_Status.NOT_FOUND, 0).encode())
            return False
        try:
            await ep.send(_Header(_Status.FOUND, payload.nbytes).encode())
            if payload.nbytes:
                await ep.send(payload)  # zero-copy: UCX reads the pinned blocks themselves
            await ep.recv(np.empty(1, dtype=np.uint64))  # the ack: the payload has landed
        finally:
            self._source.close(request_id)
        return True


async def _next_request(ep) -> _PullRequest | None:
    """The next pull request on an endpoint; None once the puller has closed it (or sent a malformed
    one: the endpoint is then closed)."""
    import ucxx

    raw = np.zeros(_PullRequest.SIZE, dtype=np.uint8)
    try:
        await ep.recv(raw)
    except ucxx.exceptions.UCXError:
        return None
    return _PullRequest.decode(raw)


class UcxKvPuller(KvPuller):
    """Pulls payloads from UcxKvServers over pooled endpoints (see the module doc).

    A pull that takes longer than timeout_s fails with KvPullError; given the receiving cache's
    layout, a handle that does not fit it fails (InvalidKvHandle) before anything is sent or allocated.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_idle_per_peer: int = MAX_IDLE_ENDPOINTS_PER_PEER, layout: KVLayout | None = None,
                 max_idle_peers: int = MAX_IDLE_PEERS) -> None:
        self._timeout_s = timeout_s
        self._max_idle_per_peer = max_idle_per_peer
        self._max_idle_peers = max_idle_peers
        self._layout = layout
        self._idle: OrderedDict[str, list] = OrderedDict()  # least recently used peer first
        self._acquired = False

    async def start(self) -> None:
        """Initialize UCX now: measured, a first pull that does it takes ~0.7 s instead of ~10 ms."""
        if not self._acquired:
            _RUNTIME.acquire()
            self._acquired = True

    async def pull(self, handle: pb.KvHandle, first_block: int = 0) -> memoryview:
        if self._layout is not None:
            check_handle(handle, self._layout)
        size = pull_size(handle, first_block)
        await self.start()
        try:
            async with asyncio.timeout(self._timeout_s):
                ep = await self._checkout(handle.ucx_address)
                return await self._pull_on(ep, handle, first_block, size)
        except _ucx_errors() as exc:
            raise KvPullError(f"UCX pull of {handle.request_id} from {handle.ucx_address}: {exc!r}") from exc

    async def close(self) -> None:
        """Close every idle endpoint and release UCX (the last user in the process resets it)."""
        idle, self._idle = self._idle, {}
        for endpoints in idle.values():
            for ep in endpoints:
                ep.abort()
        if self._acquired:
            self._acquired = False
            _RUNTIME.release()

    async def _pull_on(self, ep, handle: pb.KvHandle, first_block: int, size: int) -> memoryview:
        try:
            payload = await _fetch(ep, handle, first_block, size)
        except BaseException:
            ep.abort()  # the stream may stop mid-message: never reuse it
            raise
        self._checkin(handle.ucx_address, ep)
        return payload

    async def _checkout(self, address: str):
        """An idle endpoint to address that is still alive, or a new one."""
        idle = self._idle.pop(address, [])
        while idle:
            ep = idle.pop()
            if not ep.closed:
                if idle:
                    self._idle[address] = idle
                return ep
            ep.abort()
        import ucxx

        host, port = split_address(address)
        return await ucxx.create_endpoint(host, port)

    def _checkin(self, address: str, ep) -> None:
        idle = self._idle.setdefault(address, [])
        self._idle.move_to_end(address)
        if len(idle) < self._max_idle_per_peer:
            idle.append(ep)
        else:
            ep.abort()
        while len(self._idle) > self._max_idle_peers:
            for stale in self._idle.popitem(last=False)[1]:
                stale.abort()

    @property
    def num_idle_peers(self) -> int:
        """Prefill servers this puller keeps idle endpoints to."""
        return len(self._idle)


async def _fetch(ep, handle: pb.KvHandle, first_block: int, size: int) -> memoryview:
    """Request, header, payload, ack: the puller's half of one pull (size bytes)."""
    await ep.send(_PullRequest(handle.request_id, handle.capability, first_block).encode())
    raw = _Header.empty()
    await ep.recv(raw)
    header = _Header.decode(raw)
    if header.status is _Status.DENIED:
        raise KvPermissionDenied(f"prefill server at {handle.ucx_address} refused the capability for "
                                 f"{handle.request_id}")
    if header.status is _Status.NOT_FOUND:
        raise KvPullError(f"prefill server at {handle.ucx_address} does not hold {handle.request_id}")
    if header.status is _Status.INVALID:
        raise InvalidKvHandle(f"prefill server at {handle.ucx_address} holds no block {first_block} of "
                              f"{handle.request_id}")
    if header.num_bytes != size:
        raise KvPullError(f"{handle.request_id}: the server sends {header.num_bytes} bytes, the pull "
                          f"takes {size}")
    payload = np.empty(header.num_bytes, dtype=np.uint8)
    if header.num_bytes:
        await ep.recv(payload)
    await ep.send(_ACK)
    return memoryview(payload)
