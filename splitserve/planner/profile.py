"""`splitserve profile`: measure this machine's latency model and write it as a profile.

For each core count (1..N by default, N = the cores this process may use), a fresh process pinned to
that many cores with one torch thread per core (`python -m splitserve.planner.measure`, placed as
`splitserve up` places a worker) times prefill batches, decode batches and mixed steps; then this
process pulls KV payloads over the chosen transport (the code of `bench kv`). For each core count
that leaves cores free, a few shapes are timed again alone and beside busy cores: on each other
core a process runs prefill steps back to back and another decode steps, paused and resumed in turn
by the measuring process, and the slowdown is the profile's Contention. The samples are fitted
(latency.py), the fits and their errors printed, and everything, samples included, written as JSON.
The cluster's own hops and step slowdowns are not measured here: they keep the documented defaults
until `bench serve` runs calibrate them (docs/planner.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from splitserve.common.cpuinfo import processor_generation, processor_name
from splitserve.common.engine_args import format_cpus
from splitserve.planner.latency import (
    STEP_KINDS,
    DegreeProfile,
    ModelInfo,
    Overheads,
    Profile,
    fit_contention,
    fit_degree,
    fit_kv,
    load_profile,
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
    return argv + (["--model", args.model] if args.model else [])


def measure_degree(args: argparse.Namespace, cpus: list[int], *extra: str) -> dict:
    """Run the measuring process on these cores; its JSON document (progress goes to stderr)."""
    print(f"measuring on {len(cpus)} core(s): {format_cpus(cpus)} {' '.join(extra)}", file=sys.stderr, flush=True)
    out = subprocess.run(_measure_argv(args, cpus) + list(extra), stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        raise OSError(f"the measuring process on cores {format_cpus(cpus)} failed (exit {out.returncode})")
    return json.loads(out.stdout)


LOAD_START_TIMEOUT_S = 300.0


@contextlib.contextmanager
def loads(args: argparse.Namespace, cores: list[int]):
    """On each core, a process per step kind running such steps back to back (measure.py --load):
    {kind: pids}, until the block ends."""
    argv = [sys.executable, "-m", "splitserve.planner.measure", "--dtype", args.dtype, "--device", args.device,
            "--block-size", str(args.block_size), "--threads", "1"]
    argv += ["--model", args.model] if args.model else []
    started: dict[str, list[subprocess.Popen]] = {kind: [] for kind in STEP_KINDS}
    try:
        for kind in STEP_KINDS:
            for core in cores:
                started[kind].append(subprocess.Popen(argv + ["--load", kind, "--cpus", str(core)],
                                                      stdout=subprocess.PIPE, text=True))
        for kind, procs in started.items():
            for proc in procs:
                ready = select.select([proc.stdout], [], [], LOAD_START_TIMEOUT_S)[0]
                if not ready or proc.stdout.readline().strip() != "ready":
                    raise OSError(f"a {kind} load process did not start (exit {proc.poll()})")
        yield {kind: [proc.pid for proc in procs] for kind, procs in started.items()}
        # A load that died mid-way turned "beside" into "alone": the measurement is worthless.
        dead = [f"{kind} (exit {proc.poll()})" for kind, procs in started.items() for proc in procs
                if proc.poll() is not None]
        if dead:
            raise OSError(f"load processes ended during the measurement: {', '.join(dead)}")
    finally:
        for proc in (proc for procs in started.values() for proc in procs):
            proc.terminate()
            proc.send_signal(signal.SIGCONT)  # a paused process takes its SIGTERM once resumed
            proc.wait()


def measure_contention(args: argparse.Namespace, cpus: list[int], degree: int) -> dict:
    """The contention shapes on the first `degree` cores, alone and beside each kind of busy core."""
    with loads(args, cpus[degree:]) as pids:
        beside = [arg for kind, kind_pids in pids.items()
                  for arg in ("--beside", f"{kind}={','.join(map(str, kind_pids))}")]
        quick = ["--quick"] if args.quick else []
        return measure_degree(args, cpus[:degree], "--contention", *quick, *beside)["contention"]


def measure_kv(transport: str, tokens: tuple[int, ...], bytes_per_token: int, repeat: int) -> list[dict]:
    """Pull synthetic payloads of these prompt lengths from a fresh serving process (`bench kv`)."""
    from splitserve.bench.kv_bench import measure_pull_ms
    from splitserve.bench.kv_serve import KvServeProcess, payload_id
    from splitserve.common.auth import NO_AUTH
    from splitserve.kv_transfer.factory import make_kv_puller, transport_value
    from splitserve.v1 import common_pb2 as pb

    sizes = sorted({n * bytes_per_token for n in tokens})

    async def pull_all(info) -> list[dict]:
        puller = make_kv_puller(transport, NO_AUTH)  # a local serving process of synthetic payloads
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
        c = d.contention
        if c.notes:
            slowdowns = "  ".join(f"{step} beside {other} +{c.slowdown(step, other):.1%}"
                                  for step in STEP_KINDS for other in STEP_KINDS)
            lines.append(f"{degree:>5}  {'busy':<8}{slowdowns}")
    kv = profile.kv_transfer
    lines.append(_row(f"{'':>5}  {'kv':<8}{f'latency={kv.latency_s * 1e3:.2f} ms  bandwidth={kv.bandwidth_gbps:.2f} GB/s':<62}",
                      kv.error))
    return "\n".join(lines)


def _row(head: str, error) -> str:
    if error is None:
        return head
    return f"{head}{error.num_samples:>4}{error.mean_rel_error:>10.1%}{error.max_rel_error:>9.1%}"


def add_contention(args: argparse.Namespace, cpus: list[int]) -> int:
    """Measure the contention of an existing profile's degrees and write it back into the profile."""
    profile = load_profile(args.add_contention)
    if profile.machine.get("device", "cpu") != "cpu":
        raise ValueError(f"{args.add_contention}: contention is measured between CPU cores, not devices")
    degrees = dict(profile.degrees)
    for k, d in sorted(degrees.items()):
        if k < len(cpus):
            samples = {**d.samples, "contention": measure_contention(args, cpus, k)}
            degrees[k] = replace(d, samples=samples, contention=fit_contention(samples["contention"]))
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    earlier = re.sub(r"; contention measured by [^;]*", "", profile.source)  # measured again: replaced
    source = f"{earlier}; contention measured by `splitserve profile --add-contention` at {now}"
    profile = replace(profile, degrees=degrees, source=source)
    print(fit_table(profile))
    save_profile(profile, args.add_contention)
    print(f"wrote {args.add_contention}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    if args.add_contention:
        return add_contention(args, cpus)
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output {args.output}: its folder does not exist")
    shapes = ["--quick"] if args.quick else []
    measured = {k: measure_degree(args, cpus[:k], *shapes) for k in _core_counts(args, cpus)}
    if args.device == "cpu" and not args.quick:  # a GPU worker's neighbours are other devices
        for k, m in measured.items():
            if k < len(cpus):
                m["samples"]["contention"] = measure_contention(args, cpus, k)
    first = next(iter(measured.values()))
    model = ModelInfo(**first["model"])
    tokens = QUICK_KV_TOKENS if args.quick else KV_TOKENS
    kv = fit_kv(measure_kv(args.kv_transport, tokens, model.kv_bytes_per_token, args.repeat), args.kv_transport)
    degrees: dict[int, DegreeProfile] = {k: fit_degree(k, m["samples"]) for k, m in measured.items()}
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = {"description": args.description or platform.node(), "processor": processor_name(),
               **processor_generation(), "num_cores": len(cpus), "device": args.device,
               "torch": first["torch"], "measured_at": now}
    source = f"measured by `splitserve profile{' --quick' if args.quick else ''}` (repeat {args.repeat})"
    profile = Profile(source, machine, model, degrees, kv, Overheads(notes="defaults: not measured by profile"),
                      "cores per worker" if args.device == "cpu" else "devices per worker")
    print(fit_table(profile))
    save_profile(profile, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
