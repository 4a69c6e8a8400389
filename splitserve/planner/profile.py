"""`splitserve profile`: measure this machine's latency model and write it as a profile.

For each core count (1..N by default, N = the cores this process may use), a fresh process pinned to
that many cores with one torch thread per core (`python -m splitserve.planner.measure`, placed as
`splitserve up` places a worker) times prefill batches, decode batches and mixed steps; then this
process pulls KV payloads over the chosen transport (the code of `bench kv`). The samples are fitted
(latency.py), the fits and their errors printed, and everything, samples included, written as JSON.
The cluster's own hops and step slowdowns are not measured here: they keep the documented defaults
until a low-load `bench serve` run calibrates them (docs/planner.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from splitserve.common.engine_args import format_cpus
from splitserve.planner.latency import (
    DegreeProfile,
    ModelInfo,
    Overheads,
    Profile,
    fit_degree,
    fit_kv,
    save_profile,
)

QUICK_KV_TOKENS = (64, 256)
KV_TOKENS = (64, 256, 1024, 2048, 4096)


def _core_counts(args: argparse.Namespace, cpus: list[int]) -> list[int]:
    if args.device != "cpu":
        return [1]  # one device per worker; multi-device workers are not supported yet
    counts = args.cores or list(range(1, len(cpus) + 1))
    if max(counts) > len(cpus):
        raise ValueError(f"--cores {max(counts)}: this process may only use {len(cpus)} cores")
    return counts


def _measure_argv(args: argparse.Namespace, cpus: list[int]) -> list[str]:
    argv = [sys.executable, "-m", "splitserve.planner.measure", "--repeat", str(args.repeat),
            "--dtype", args.dtype, "--device", args.device, "--block-size", str(args.block_size)]
    if args.device == "cpu":
        argv += ["--cpus", format_cpus(cpus), "--threads", str(len(cpus))]
    return argv + (["--quick"] if args.quick else []) + (["--model", args.model] if args.model else [])


def measure_degree(args: argparse.Namespace, cpus: list[int]) -> dict:
    """Run the measuring process on these cores; its JSON document (progress goes to stderr)."""
    print(f"measuring on {len(cpus)} core(s): {format_cpus(cpus)}", file=sys.stderr, flush=True)
    out = subprocess.run(_measure_argv(args, cpus), stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        raise OSError(f"the measuring process on cores {format_cpus(cpus)} failed (exit {out.returncode})")
    return json.loads(out.stdout)


def measure_kv(transport: str, tokens: tuple[int, ...], bytes_per_token: int, repeat: int) -> list[dict]:
    """Pull synthetic payloads of these prompt lengths from a fresh serving process (`bench kv`)."""
    from splitserve.bench.kv_bench import measure_pull_ms
    from splitserve.bench.kv_serve import KvServeProcess, payload_id
    from splitserve.kv_transfer.factory import make_kv_puller, transport_value
    from splitserve.v1 import common_pb2 as pb

    sizes = sorted({n * bytes_per_token for n in tokens})

    async def pull_all(info) -> list[dict]:
        puller = make_kv_puller(transport)
        try:
            samples = []
            for num_bytes in sizes:
                handle = pb.KvHandle(request_id=payload_id(num_bytes), prefill_grpc_address=info.grpc_address,
                                     transport=transport_value(transport), ucx_address=info.ucx_address,
                                     num_tokens=num_bytes // bytes_per_token, num_bytes=num_bytes)
                samples.append({"bytes": num_bytes, "s": await measure_pull_ms(puller, handle, repeat) / 1e3})
            return samples
        finally:
            await puller.close()

    with KvServeProcess("127.0.0.1", sizes) as server:
        return asyncio.run(pull_all(server.info))


def fit_table(profile: Profile) -> str:
    """The fitted models and their errors, one row per model."""
    lines = [f"{'cores':>5}  {'model':<8}{'coefficients':<62}{'n':>4}{'mean err':>10}{'max err':>9}"]
    for degree, d in sorted(profile.degrees.items()):
        for name, model in (("prefill", d.prefill), ("decode", d.decode), ("mixed", d.mixed)):
            if model is not None:
                coef = "  ".join(f"{k}={getattr(model, k):.4g}" for k in "abcd" if hasattr(model, k))
                lines.append(_row(f"{degree:>5}  {name:<8}{coef:<62}", model.error))
    kv = profile.kv_transfer
    lines.append(_row(f"{'':>5}  {'kv':<8}{f'latency={kv.latency_s * 1e3:.2f} ms  bandwidth={kv.bandwidth_gbps:.2f} GB/s':<62}",
                      kv.error))
    return "\n".join(lines)


def _row(head: str, error) -> str:
    if error is None:
        return head
    return f"{head}{error.num_samples:>4}{error.mean_rel_error:>10.1%}{error.max_rel_error:>9.1%}"


def run(args: argparse.Namespace) -> int:
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output {args.output}: its folder does not exist")
    cpus = sorted(os.sched_getaffinity(0))
    measured = {k: measure_degree(args, cpus[:k]) for k in _core_counts(args, cpus)}
    first = next(iter(measured.values()))
    model = ModelInfo(**first["model"])
    tokens = QUICK_KV_TOKENS if args.quick else KV_TOKENS
    kv = fit_kv(measure_kv(args.kv_transport, tokens, model.kv_bytes_per_token, args.repeat), args.kv_transport)
    degrees: dict[int, DegreeProfile] = {k: fit_degree(k, m["samples"]) for k, m in measured.items()}
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = {"description": args.description or platform.node(), "processor": _processor(),
               "num_cores": len(cpus), "device": args.device, "torch": first["torch"], "measured_at": now}
    source = f"measured by `splitserve profile{' --quick' if args.quick else ''}` (repeat {args.repeat})"
    profile = Profile(source, machine, model, degrees, kv, Overheads(notes="defaults: not measured by profile"),
                      "cores per worker" if args.device == "cpu" else "devices per worker")
    print(fit_table(profile))
    save_profile(profile, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
