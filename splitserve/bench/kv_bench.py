"""`splitserve bench kv`: pull synthetic KV payloads across two processes over each transport, next
to a local memcpy of the same bytes. "grpc+tls" is the gRPC transport over mutual TLS, as a cluster
with --cluster-tls-dir runs it (certificates made for the run; the serving side checks the puller's
role as a prefill server does); UCX carries no encryption.

The payloads have the byte sizes of prompts of the given token counts (bytes per token = num_layers
* 2 (K, V) * num_kv_heads * head_dim * itemsize). A fresh serving process (`kv_serve.py`) holds them
behind both transports; this process pulls each one --repeat times after a warm-up pull, checks
every byte, and reports the median. A pull lands in fresh memory, as the KvPuller interface
returns it; the memcpy copies into a buffer allocated and touched beforehand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from splitserve.bench.kv_serve import KvServeProcess, ServeInfo, make_payload, payload_id
from splitserve.kv_transfer.base import KvPuller, KvPullError
from splitserve.common.auth import NO_AUTH, ClusterAuth
from splitserve.common.certs import load_cluster_tls, write_cluster_certs
from splitserve.kv_transfer.factory import make_kv_puller, transport_value
from splitserve.v1 import common_pb2 as pb

DEFAULT_TOKENS = (1024, 4096, 16384)
BENCH_TRANSPORTS = ("ucx", "grpc", "grpc+tls")
# SmolLM2-135M (the default model) in bfloat16: 30 layers * (K, V) * 3 KV heads * head_dim 64 * 2 bytes.
DEFAULT_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2


@dataclass(frozen=True)
class KvBenchRow:
    """One transport and payload size: median pull time and the memcpy of the same bytes."""

    transport: str
    num_tokens: int
    num_bytes: int
    median_ms: float
    gbps: float
    memcpy_ms: float
    memcpy_gbps: float


@dataclass(frozen=True)
class KvBenchReport:
    bytes_per_token: int
    repeat: int
    rows: list[KvBenchRow]


@dataclass(frozen=True)
class _Shape:
    num_tokens: int
    num_bytes: int


def _gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


def measure_memcpy_ms(num_bytes: int, repeat: int) -> float:
    """Median time of a numpy copy of num_bytes into a preallocated, already touched buffer."""
    src = make_payload(num_bytes)
    dst = np.ones_like(src)
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def _handle(transport: str, shape: _Shape, info: ServeInfo) -> pb.KvHandle:
    grpc_address = info.grpc_tls_address if transport == "grpc+tls" else info.grpc_address
    return pb.KvHandle(request_id=payload_id(shape.num_bytes), prefill_grpc_address=grpc_address,
                       transport=transport_value(transport.removesuffix("+tls")), ucx_address=info.ucx_address,
                       num_tokens=shape.num_tokens, num_bytes=shape.num_bytes)


async def measure_pull_ms(puller: KvPuller, handle: pb.KvHandle, repeat: int) -> float:
    """Median time of a pull after one warm-up pull; every pull's bytes are checked."""
    expected = make_payload(handle.num_bytes)
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        payload = await puller.pull(handle)
        times.append(time.perf_counter() - start)
        if not np.array_equal(np.frombuffer(payload, dtype=np.uint8), expected):
            raise KvPullError(f"{handle.request_id}: the pulled bytes differ from the served ones")
        del payload
    return statistics.median(times[1:]) * 1e3


async def _bench_transport(transport: str, shapes: list[_Shape], info: ServeInfo, repeat: int,
                           memcpy_ms: dict[int, float], tls_dir: Path | None) -> list[KvBenchRow]:
    # A local serving process of synthetic payloads: no token; over TLS a decode server's certificate.
    auth = ClusterAuth(None, load_cluster_tls(tls_dir / "decode")) if transport == "grpc+tls" else NO_AUTH
    puller = make_kv_puller(transport.removesuffix("+tls"), auth)
    rows = []
    try:
        for shape in shapes:
            ms = await measure_pull_ms(puller, _handle(transport, shape, info), repeat)
            copy_ms = memcpy_ms[shape.num_bytes]
            rows.append(KvBenchRow(transport, shape.num_tokens, shape.num_bytes, ms, _gbps(shape.num_bytes, ms),
                                   copy_ms, _gbps(shape.num_bytes, copy_ms)))
    finally:
        await puller.close()
    return rows


def format_table(report: KvBenchReport) -> str:
    header = (f"{'transport':<10}{'tokens':>8}{'MiB':>9}{'median ms':>12}{'GB/s':>8}"
              f"{'memcpy ms':>12}{'memcpy GB/s':>13}")
    lines = [header, "-" * len(header)]
    for r in report.rows:
        lines.append(f"{r.transport:<10}{r.num_tokens:>8}{r.num_bytes / 2**20:>9.1f}{r.median_ms:>12.2f}"
                     f"{r.gbps:>8.2f}{r.memcpy_ms:>12.2f}{r.memcpy_gbps:>13.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    shapes = [_Shape(n, n * args.bytes_per_token) for n in args.tokens]
    sizes = sorted({s.num_bytes for s in shapes})
    memcpy_ms = {n: measure_memcpy_ms(n, args.repeat) for n in sizes}
    rows = []
    with tempfile.TemporaryDirectory(prefix="splitserve-kv-bench-") as certs:
        tls_dir = Path(certs) if "grpc+tls" in args.transports else None
        if tls_dir:
            write_cluster_certs(tls_dir, days=1, roles=("prefill", "decode"))
        with KvServeProcess(args.host, sizes, tls_dir=tls_dir and tls_dir / "prefill") as server:
            for transport in args.transports:
                rows += asyncio.run(_bench_transport(transport, shapes, server.info, args.repeat, memcpy_ms,
                                                     tls_dir))
    if server.stats.num_opens != server.stats.num_closes:
        raise RuntimeError(f"the serving process leaked pins: {server.stats}")
    report = KvBenchReport(args.bytes_per_token, args.repeat, rows)
    print(format_table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0
