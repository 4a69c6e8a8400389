"""`splitserve simulate`'s flags -> the profile, the cluster and the `bench serve` config to simulate."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from splitserve.bench.loadgen.config import (BackendConfig, ServeConfig, shared_prefix_from_args,
                                             trace_from_args)
from splitserve.bench.loadgen.metrics import Slo
from splitserve.bench.loadgen.workloads import get_workload, preset_slos
from splitserve.commands.up import split_cpus
from splitserve.planner.latency import Profile, load_profile
from splitserve.planner.sim_engine import EngineSettings
from splitserve.planner.simulator import DEFAULT_CHUNK_SIZE, DEFAULT_PREFILL_SLICE_MS, ClusterSpec, Mode
from splitserve.planner.sweep import SimulatedRun, machine_profile


@dataclass(frozen=True)
class SimulateSetup:
    run: SimulatedRun
    warnings: list[str] = field(default_factory=list)


def default_degrees(num_cores: int, num_prefill: int, num_decode: int) -> tuple[int, int, list[str]]:
    """Cores per prefill and per decode worker when `splitserve up` splits num_cores among them."""
    workers = num_prefill + num_decode
    shares = [len(s) for s in split_cpus(list(range(num_cores)), workers)]
    prefill, decode = set(shares[:num_prefill]), set(shares[num_prefill:]) or {shares[0]}
    if len(prefill) > 1 or len(decode) > 1:
        raise ValueError(f"{num_cores} cores do not split evenly among the workers of each role "
                         f"({shares}); give --cores-per-worker")
    warnings = [(f"{workers} workers share {num_cores} cores: the simulation does not model that "
                 "contention")] if workers > num_cores else []
    return prefill.pop(), decode.pop(), warnings


def cluster_from_args(args: argparse.Namespace, profile: Profile) -> tuple[ClusterSpec, list[str]]:
    mode = Mode(args.mode)
    if args.chunk_size and mode is not Mode.CHUNKED:
        raise ValueError("--chunk-size applies to --mode chunked")
    if getattr(args, "prefill_slice_ms", None) and mode is not Mode.LAYERED:
        raise ValueError("--prefill-slice-ms applies to --mode layered")
    disaggregated = mode is Mode.DISAGGREGATED
    num_prefill = args.prefill if disaggregated else args.colocated
    num_decode = args.decode if disaggregated else 0
    warnings: list[str] = []
    if args.cores_per_worker:
        prefill_degree = decode_degree = args.cores_per_worker
    else:
        num_cores = profile.machine.get("num_cores")
        if not num_cores:
            raise ValueError("the profile does not say how many cores its machine has; give --cores-per-worker")
        prefill_degree, decode_degree, warnings = default_degrees(int(num_cores), num_prefill, num_decode)
    engine = EngineSettings(args.token_budget, args.max_num_seqs, args.block_size,
                            int(args.kv_cache_gb * (1 << 30)),
                            enable_prefix_caching=getattr(args, "prefix_caching", True))
    cluster = ClusterSpec(mode, num_prefill, num_decode, prefill_degree, decode_degree, engine,
                          chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
                          prefill_slice_ms=(getattr(args, "prefill_slice_ms", None)
                                            or DEFAULT_PREFILL_SLICE_MS),
                          prefill_queue_factor=args.prefill_queue_factor, max_pending=args.max_pending,
                          routing=getattr(args, "routing", "kv"))
    for degree in {prefill_degree, decode_degree} if disaggregated else {prefill_degree}:
        profile.degree(degree)  # fails early, naming the degrees the profile has
    return cluster, warnings


def simulated_run_from_args(args: argparse.Namespace) -> SimulateSetup:
    for path in (args.output, args.plot):
        if path is not None and not path.resolve().parent.is_dir():
            raise ValueError(f"{path}: its folder does not exist")
    profile_path = args.profile or machine_profile()
    profile = load_profile(profile_path)
    cluster, warnings = cluster_from_args(args, profile)
    if "placeholder" in profile.source.lower():
        warnings.append(f"{profile_path} is a placeholder profile (see its 'source'), not a measured one")
    num_requests = args.num_requests or (None if args.duration else 100)
    trace = trace_from_args(args)
    if trace is not None:
        num_requests = None if args.duration else len(trace.requests)
    preset_slos(args)
    serve = ServeConfig(
        backend=BackendConfig("simulate", str(profile_path), profile.model.name),
        workload=get_workload(args.workload, args.input_len, args.output_len),
        shared_prefix=shared_prefix_from_args(args), trace=trace,
        rates=tuple(args.rates or [args.rate]), burstiness=args.burstiness, num_requests=num_requests,
        duration_s=args.duration, seed=args.seed, slo=Slo(args.ttft_slo, args.tpot_slo, args.attainment),
        label=args.label or args.mode, pause_s=0.0, output=args.output, plot=args.plot,
        keep_records=not args.no_records)
    return SimulateSetup(SimulatedRun(profile, cluster, serve), warnings)
