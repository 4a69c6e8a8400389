"""The serving half of `splitserve bench kv`: a fresh process holding synthetic KV payloads behind
both transports, as a prefill server would.

    python -m splitserve.bench.kv_serve --host 127.0.0.1 --bytes 23592960 94371840

It prints one ServeInfo JSON line on stdout once both transports listen, serves until its stdin
closes (so it also stops when its parent dies), then prints one ServeStats line and exits.
`KvServeProcess` starts and stops it from the parent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import select
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import grpc
import numpy as np

from splitserve.common.logging import configure_logging
from splitserve.common.auth import NO_AUTH, ClusterAuth
from splitserve.common.certs import ClusterTLS, load_cluster_tls
from splitserve.common.rpc import bind, make_server
from splitserve.kv_transfer.base import InvalidKvHandle, KvSource, check_capability
from splitserve.kv_transfer.grpc import GrpcKvServer
from splitserve.kv_transfer.ucx import UcxKvServer
from splitserve.v1 import prefill_pb2_grpc

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd, so consecutive words differ in every byte lane


def payload_id(num_bytes: int) -> str:
    """The request id under which the server holds a payload of num_bytes."""
    return f"bench-kv-{num_bytes}"


def make_payload(num_bytes: int) -> np.ndarray:
    """Deterministic bytes that catch reordered, shifted or dropped chunks (unlike zeros would)."""
    words = np.arange((num_bytes + 7) // 8, dtype=np.uint64)
    words *= _GOLDEN
    words += np.uint64(num_bytes)
    return words.view(np.uint8)[:num_bytes]


@dataclass(frozen=True)
class ServeInfo:
    """Where the serving process listens."""

    grpc_address: str
    ucx_address: str
    grpc_tls_address: str = ""  # the same PullKv over mutual TLS, when started with certificates


@dataclass(frozen=True)
class ServeStats:
    """How often the serving process's source was opened and closed (equal when no pin leaked)."""

    num_opens: int
    num_closes: int


class SyntheticKvSource:
    """A KvSource over fixed payloads that counts its pins; each payload's capability is
    `capability` (the empty one by default, which benchmark handles present). A payload is blocks
    of block_bytes (None: one block) for pulls that start past its first."""

    def __init__(self, payloads: dict[str, np.ndarray], capability: str = "",
                 block_bytes: int | None = None) -> None:
        self._payloads = payloads
        self._capability = capability
        self._block_bytes = block_bytes
        self.num_opens = 0
        self.num_closes = 0

    async def open(self, request_id: str, capability: str, first_block: int = 0) -> memoryview | None:
        payload = self._payloads.get(request_id)
        if payload is None:
            return None
        check_capability(self._capability, capability, request_id)
        block_bytes = self._block_bytes or payload.nbytes
        if not 0 <= first_block < max(1, payload.nbytes // block_bytes):
            raise InvalidKvHandle(f"{request_id}: no block {first_block}")
        self.num_opens += 1
        return memoryview(payload[first_block * block_bytes:])

    def close(self, request_id: str) -> None:
        self.num_closes += 1

    @property
    def stats(self) -> ServeStats:
        return ServeStats(self.num_opens, self.num_closes)


class KvOnlyPrefillServicer(prefill_pb2_grpc.PrefillServicer):
    """A Prefill service that only answers PullKv, delegating it as the real servicer does."""

    def __init__(self, kv_server: GrpcKvServer) -> None:
        self._kv_server = kv_server

    async def PullKv(self, request, context):
        async for chunk in self._kv_server.pull_kv(request, context):
            yield chunk


@dataclass
class KvServers:
    """Both transports serving one source in this process, as a prefill server runs them."""

    grpc_servers: list[grpc.aio.Server]
    grpc_kv: GrpcKvServer
    ucx_kv: UcxKvServer
    info: ServeInfo

    async def stop(self) -> None:
        await self.ucx_kv.stop()
        await self.grpc_kv.stop()
        for server in self.grpc_servers:
            await server.stop(grace=1.0)


async def start_kv_servers(host: str, source: KvSource, tls: ClusterTLS | None = None) -> KvServers:
    """A grpc.aio server with PullKv and a UCX listener, both on free ports of host; with tls (a
    prefill server's certificates) a second gRPC server too, serving the same PullKv over mutual TLS
    as a cluster with --cluster-tls-dir does."""
    grpc_kv, ucx_kv = GrpcKvServer(), UcxKvServer(host)
    servers, addresses = [], []
    # Synthetic payloads only, on the host the benchmark names: no token.
    for auth in (NO_AUTH, *([ClusterAuth(None, tls)] if tls else [])):
        server = make_server(auth)
        prefill_pb2_grpc.add_PrefillServicer_to_server(KvOnlyPrefillServicer(grpc_kv), server)
        addresses.append(f"{host}:{bind(server, host, 0, auth.server_credentials())}")
        await server.start()
        servers.append(server)
    await grpc_kv.start(source)
    await ucx_kv.start(source)
    return KvServers(servers, grpc_kv, ucx_kv, ServeInfo(addresses[0], ucx_kv.address, "".join(addresses[1:])))


async def serve(host: str, sizes: list[int], tls: ClusterTLS | None = None) -> None:
    """Serve payloads of the given sizes over both transports (and gRPC over TLS with tls) until stdin closes."""
    source = SyntheticKvSource({payload_id(n): make_payload(n) for n in sizes})
    servers = await start_kv_servers(host, source, tls)
    try:
        _emit(servers.info)
        await asyncio.to_thread(sys.stdin.buffer.read)
    finally:
        await servers.stop()
    _emit(source.stats)


def _emit(record: ServeInfo | ServeStats) -> None:
    print(json.dumps(asdict(record)), flush=True)


class KvServeProcess:
    """The serving process, started fresh (never forked: UCX must not be initialized before a fork).

    Use as a context manager; leaving it closes the child's stdin and waits for its ServeStats.
    """

    def __init__(self, host: str, sizes: list[int], start_timeout_s: float = 60.0,
                 tls_dir: Path | None = None) -> None:
        self._command = [sys.executable, "-m", "splitserve.bench.kv_serve", "--host", host,
                         "--bytes", *map(str, sizes), *(["--tls-dir", str(tls_dir)] if tls_dir else [])]
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen | None = None
        self.info: ServeInfo | None = None
        self.stats: ServeStats | None = None

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            self._wait_readable(self._start_timeout_s)
            self.info = ServeInfo(**json.loads(self._read_line()))
        except BaseException:
            self._process.kill()
            self._process.wait()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.stop()
            return
        with contextlib.suppress(RuntimeError):  # the error already raised is the one to report
            self.stop()

    def stop(self, timeout_s: float = 20.0) -> ServeStats:
        """Ask the child to stop and wait for it; kill it when it does not stop in time."""
        if self.stats is not None:
            return self.stats
        self._process.stdin.close()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise RuntimeError(f"the KV serving process did not stop within {timeout_s} s")
        if self._process.returncode != 0:
            raise RuntimeError(f"the KV serving process exited with status {self._process.returncode}")
        self.stats = ServeStats(**json.loads(self._read_line()))
        return self.stats

    def _wait_readable(self, timeout_s: float) -> None:
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"the KV serving process did not start within {timeout_s} s")

    def _read_line(self) -> str:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the KV serving process exited early (status {self._process.poll()})")
        return line.decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bytes", type=int, nargs="+", required=True, help="payload sizes to hold")
    parser.add_argument("--tls-dir", default=None, help="a prefill server's certificates: serve PullKv over "
                                                        "mutual TLS too")
    args = parser.parse_args(argv)
    configure_logging("warning", json_logs=False)  # stdout carries the protocol lines only
    asyncio.run(serve(args.host, args.bytes, load_cluster_tls(args.tls_dir) if args.tls_dir else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
