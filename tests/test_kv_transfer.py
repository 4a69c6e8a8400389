"""Both KV transports behind the same tests: byte-exact pulls, errors as KvPullError, pins closed.

Most tests run the servers and the puller in one event loop of this process, which also checks
that ucxx and grpc.aio share a loop; one test per transport pulls from a fresh serving process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from splitserve.bench.kv_serve import (
    KvServeProcess,
    KvServers,
    ServeInfo,
    SyntheticKvSource,
    make_payload,
    payload_id,
    start_kv_servers,
)
from splitserve.common.auth import NO_AUTH
from splitserve.kv_transfer.base import InvalidKvHandle, KvPermissionDenied, KvPuller, KvPullError
from splitserve.kv_transfer.factory import make_kv_puller, make_kv_server, transport_name, transport_value
from splitserve.kv_transfer.grpc import CHUNK_BYTES, GrpcKvPuller, GrpcKvServer
from splitserve.kv_transfer.ucx import UcxKvPuller, UcxKvServer, _Header, _PullRequest, _Status, split_address
from splitserve.v1 import common_pb2 as pb

pytestmark = pytest.mark.timeout(60)
# Every async test and fixture here shares one event loop: UCX binds to the loop it starts in.
module_loop = pytest.mark.asyncio(loop_scope="module")

TRANSPORTS = ["ucx", "grpc"]
# Odd sizes on purpose: one byte, and a few bytes past a chunk boundary of the gRPC transport.
SIZES = [1, 1000, 3 * CHUNK_BYTES + 5]


class BalancedSource(SyntheticKvSource):
    """A SyntheticKvSource that signals whenever every pin it handed out has been closed."""

    def __init__(self, sizes: list[int], capability: str = "", block_bytes: int | None = None) -> None:
        super().__init__({payload_id(n): make_payload(n) for n in sizes}, capability, block_bytes)
        self.balanced = asyncio.Event()

    async def open(self, request_id: str, capability: str, first_block: int = 0) -> memoryview | None:
        payload = await super().open(request_id, capability, first_block)
        if payload is not None:
            self.balanced.clear()
        return payload

    def close(self, request_id: str) -> None:
        super().close(request_id)
        if self.num_closes == self.num_opens:
            self.balanced.set()

    async def wait_balanced(self) -> None:
        await asyncio.wait_for(self.balanced.wait(), timeout=10)
        assert self.num_closes == self.num_opens


@dataclass
class Served:
    source: BalancedSource
    servers: KvServers
    puller: KvPuller
    transport: str


def make_handle(transport: str, info: ServeInfo, num_bytes: int, request_id: str | None = None) -> pb.KvHandle:
    return pb.KvHandle(request_id=request_id or payload_id(num_bytes), prefill_grpc_address=info.grpc_address,
                       transport=transport_value(transport), ucx_address=info.ucx_address, num_bytes=num_bytes)


def assert_payload(pulled: memoryview, num_bytes: int) -> None:
    assert pulled.nbytes == num_bytes
    assert np.array_equal(np.frombuffer(pulled, dtype=np.uint8), make_payload(num_bytes))


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def ucx_kept_up() -> AsyncIterator[None]:
    """UCX resets when its last user in a process closes, which takes up to a second (ucxx's notifier
    thread checks for its stop request once a second); a listener held for the whole module keeps
    UCX up between tests."""
    server = UcxKvServer("127.0.0.1")
    await server.start(SyntheticKvSource({}))
    yield
    await server.stop()


@pytest_asyncio.fixture(params=TRANSPORTS, loop_scope="module")
async def served(request) -> AsyncIterator[Served]:
    """Both transports serving SIZES in this loop, and a puller for the transport under test."""
    source = BalancedSource(SIZES)
    servers = await start_kv_servers("127.0.0.1", source)
    puller = make_kv_puller(request.param, NO_AUTH)
    try:
        yield Served(source, servers, puller, request.param)
    finally:
        await puller.close()
        await servers.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
@module_loop
async def test_a_pull_from_a_later_block_gets_only_the_blocks_from_there(transport: str) -> None:
    """A decode server with a prefix cached pulls the rest: exactly the bytes from that block on. A
    first block past the request's (the handle lies about its size) is refused by the server, one
    past the handle's by the puller, and neither leaves a pin."""
    source = BalancedSource([4000], block_bytes=1000)
    servers = await start_kv_servers("127.0.0.1", source)
    puller = make_kv_puller(transport, NO_AUTH)
    try:
        handle = make_handle(transport, servers.info, 4000)
        handle.block_ids.extend(range(4))
        for first in (0, 1, 3):
            pulled = await puller.pull(handle, first)
            assert bytes(pulled) == make_payload(4000)[first * 1000:].tobytes()
        handle.block_ids.extend(range(4, 8))
        handle.num_bytes = 8000
        with pytest.raises(InvalidKvHandle):
            await puller.pull(handle, 5)  # the server holds 4 blocks
        with pytest.raises(InvalidKvHandle):
            await puller.pull(handle, 8)  # the handle names 8: nothing is asked
        await source.wait_balanced()
        assert source.num_opens == 3
    finally:
        await puller.close()
        await servers.stop()


@module_loop
async def test_pull_round_trips_and_closes_the_pin(served: Served) -> None:
    for num_bytes in SIZES + SIZES:  # twice: the UCX puller reuses its endpoint the second time
        assert_payload(await served.puller.pull(make_handle(served.transport, served.servers.info, num_bytes)),
                       num_bytes)
    await served.source.wait_balanced()
    assert served.source.num_opens == 2 * len(SIZES)


@module_loop
async def test_not_found_raises(served: Served) -> None:
    handle = make_handle(served.transport, served.servers.info, 1000, request_id="never-prefilled")
    with pytest.raises(KvPullError):
        await served.puller.pull(handle)
    assert served.source.num_opens == 0
    # The puller is still usable after the failure.
    assert_payload(await served.puller.pull(make_handle(served.transport, served.servers.info, 1000)), 1000)


@module_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_pull_with_a_wrong_capability_is_denied_and_opens_nothing(transport: str) -> None:
    source = BalancedSource(SIZES, capability="the-request-s-own-capability-0123456789")
    servers = await start_kv_servers("127.0.0.1", source)
    puller = make_kv_puller(transport, NO_AUTH)
    try:
        for wrong in ("", "the-request-s-own-capability-012345678X", "x" * 128):
            handle = make_handle(transport, servers.info, 1000)
            handle.capability = wrong
            with pytest.raises(KvPermissionDenied):
                await puller.pull(handle)
        assert source.num_opens == 0  # nothing pinned, no byte sent
        handle = make_handle(transport, servers.info, 1000)
        handle.capability = "the-request-s-own-capability-0123456789"
        assert_payload(await puller.pull(handle), 1000)
        await source.wait_balanced()
    finally:
        await puller.close()
        await servers.stop()


@module_loop
@pytest.mark.parametrize("delta", [-1, 1])
async def test_size_mismatch_raises_and_closes_the_pin(served: Served, delta: int) -> None:
    num_bytes = SIZES[-1]
    handle = make_handle(served.transport, served.servers.info, num_bytes + delta, request_id=payload_id(num_bytes))
    with pytest.raises(KvPullError):
        await served.puller.pull(handle)
    await served.source.wait_balanced()
    assert served.source.num_opens == 1
    assert_payload(await served.puller.pull(make_handle(served.transport, served.servers.info, num_bytes)),
                   num_bytes)


@module_loop
async def test_concurrent_pulls_of_different_requests(served: Served) -> None:
    handles = [make_handle(served.transport, served.servers.info, n) for n in SIZES * 3]
    pulled = await asyncio.gather(*(served.puller.pull(h) for h in handles))
    for payload, handle in zip(pulled, handles):
        assert_payload(payload, handle.num_bytes)
    await served.source.wait_balanced()
    assert served.source.num_opens == len(handles)


@module_loop
async def test_unreachable_server_raises() -> None:
    for transport, puller in (("ucx", UcxKvPuller(timeout_s=1.0)), ("grpc", GrpcKvPuller(NO_AUTH, timeout_s=1.0))):
        info = ServeInfo(grpc_address="127.0.0.1:1", ucx_address="127.0.0.1:1")
        try:
            with pytest.raises(KvPullError):
                await puller.pull(make_handle(transport, info, 10))
        finally:
            await puller.close()


@module_loop
async def test_a_stalled_ucx_puller_is_cut_off_at_the_deadline_and_the_pin_closed() -> None:
    import ucxx

    num_bytes = SIZES[-1]
    source = BalancedSource([num_bytes])
    server = UcxKvServer("127.0.0.1", timeout_s=0.5)
    await server.start(source)
    ep = None
    try:
        ep = await ucxx.create_endpoint(*split_address(server.address))
        await ep.send(_PullRequest(payload_id(num_bytes), "").encode())
        header = _Header.empty()
        await ep.recv(header)  # the server has the payload pinned; this puller takes nothing more
        assert _Header.decode(header).num_bytes == num_bytes
        await source.wait_balanced()
        assert source.num_opens == 1
    finally:
        if ep is not None:
            ep.abort()
        await server.stop()


@module_loop
async def test_a_ucx_connection_that_sends_no_request_or_an_unknown_one_is_closed() -> None:
    """The listener takes connections from anyone who reaches it: one that says nothing holds a slot
    only until the first-request deadline, one that asks for a request the server does not hold is
    closed after the NOT_FOUND answer (else one such request per connection would hold every slot
    for good), and pulls on new connections go on working."""
    import ucxx

    source = BalancedSource(SIZES)
    server = UcxKvServer("127.0.0.1", first_request_timeout_s=0.5)
    await server.start(source)
    silent = None
    try:
        silent = await ucxx.create_endpoint(*split_address(server.address))
        deadline = time.monotonic() + 10
        while not server._handlers:  # the server's side of the connection comes up
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        while server._handlers:  # and goes, without a request
            assert time.monotonic() < deadline, "a silent connection was kept"
            await asyncio.sleep(0.05)
        guesser = await ucxx.create_endpoint(*split_address(server.address))
        try:
            await guesser.send(_PullRequest("no-such-request", "").encode())
            header = _Header.empty()
            await guesser.recv(header)
            assert _Header.decode(header).status is _Status.NOT_FOUND
            while server._handlers:
                assert time.monotonic() < deadline + 10, "a connection that asked for an unknown id was kept"
                await asyncio.sleep(0.05)
        finally:
            guesser.abort()
        puller = UcxKvPuller()
        try:
            handle = pb.KvHandle(request_id=payload_id(SIZES[0]), transport=pb.KV_TRANSPORT_UCX,
                                 ucx_address=server.address, num_bytes=SIZES[0])
            assert len(await puller.pull(handle)) == SIZES[0]
        finally:
            await puller.close()
    finally:
        if silent is not None:
            silent.abort()
        await server.stop()


@module_loop
async def test_ucx_and_grpc_pull_concurrently_in_one_event_loop() -> None:
    source = BalancedSource(SIZES)
    servers = await start_kv_servers("127.0.0.1", source)
    pullers = {t: make_kv_puller(t, NO_AUTH) for t in TRANSPORTS}
    try:
        handles = [make_handle(t, servers.info, n) for t in TRANSPORTS for n in SIZES]
        pulled = await asyncio.gather(*(pullers[transport_name(h.transport)].pull(h) for h in handles))
        for payload, handle in zip(pulled, handles):
            assert_payload(payload, handle.num_bytes)
    finally:
        for puller in pullers.values():
            await puller.close()
        await servers.stop()
    await source.wait_balanced()


@module_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pull_from_another_process(transport: str) -> None:
    with KvServeProcess("127.0.0.1", SIZES) as process:
        puller = make_kv_puller(transport, NO_AUTH)
        try:
            for num_bytes in SIZES:
                assert_payload(await puller.pull(make_handle(transport, process.info, num_bytes)), num_bytes)
        finally:
            await puller.close()
        stats = process.stop()
    assert stats.num_opens == stats.num_closes == len(SIZES)


def test_factory_maps_names_and_enums() -> None:
    assert transport_value("ucx") == pb.KV_TRANSPORT_UCX
    assert transport_value("grpc") == pb.KV_TRANSPORT_GRPC
    assert [transport_name(transport_value(t)) for t in TRANSPORTS] == TRANSPORTS
    assert isinstance(make_kv_server("ucx", "127.0.0.1", 0), UcxKvServer)
    assert isinstance(make_kv_server("grpc", "127.0.0.1", 0), GrpcKvServer)
    assert isinstance(make_kv_puller("ucx", NO_AUTH), UcxKvPuller)
    assert isinstance(make_kv_puller("grpc", NO_AUTH), GrpcKvPuller)
    with pytest.raises(ValueError):
        transport_value("rdma")
    with pytest.raises(ValueError):
        transport_name(pb.KV_TRANSPORT_UNSPECIFIED)


def test_bench_kv_reports_every_transport_tls_included_and_memcpy(tmp_path: Path) -> None:
    output = tmp_path / "kv.json"
    result = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "bench", "kv", "--tokens", "16", "64", "--repeat", "1",
         "--output", str(output)],
        check=False, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert "memcpy GB/s" in result.stdout
    report = json.loads(output.read_text())
    assert {(row["transport"], row["num_tokens"]) for row in report["rows"]} == \
        {(t, n) for t in (*TRANSPORTS, "grpc+tls") for n in (16, 64)}
    for row in report["rows"]:
        assert row["num_bytes"] == row["num_tokens"] * report["bytes_per_token"]
        for figure in ("median_ms", "gbps", "memcpy_ms", "memcpy_gbps"):
            assert row[figure] > 0, (row, figure)
