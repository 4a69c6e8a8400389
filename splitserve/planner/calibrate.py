"""A profile's per-degree step overheads, calibrated on low-load `bench serve` runs of the cluster.

    python -m splitserve.planner.calibrate --profile P \
        --run docs/figures/planner/overhead-disaggregated-256.json \
        --run docs/figures/planner/overhead-disaggregated-1024.json ... [--write]

A low-load run sends one request at a time (`bench serve --workload fixed --max-concurrency 1`),
so nothing queues and every gap between the cluster and the engine's own step times is overhead.
Each run is replayed through the simulator on the cluster its label names (`splitserve up`'s
default placement) with that degree's overheads zeroed. Per degree, over its runs:

- the in-cluster prefill of a run is its real TTFT P50 minus the hops (the simulated TTFT P50
  minus the profile's prefill of the prompt: gateway_s + rpc_s + reply_s);
- with one prompt length, prefill_factor = in-cluster / profile prefill and prefill_s = 0; with two
  or more, in-cluster = prefill_factor * profile prefill + prefill_s, fitted like the latency model
  (relative least squares, non-negative);
- decode_s = the mean over runs of real TPOT P50 - simulated TPOT P50. With one request in the
  cluster every decode step is a batch-1 step and each adds decode_s once, so TPOT moves by exactly
  decode_s.

A disaggregated run calibrates its workers' degree from both servers (the prefill overhead from
the prefill server, decode_s from the decode server); a colocated run, its one worker's degree.

With --loaded RUN --cpu ACCOUNT (a disaggregated `bench serve` run under load, and the CPU each
process used during it, from splitserve.planner.cpu_account; repeat both for more runs), it also
measures the load-dependent terms of the cluster's CPU that low-load runs cannot show
(sim_machine.py, SimEngine.charge). Each loaded run is simulated without them, for the requests
it admitted and the steps that emitted tokens in the simulation:

- the shared services' CPU (gateway + scheduler + Redis + load generator): with two runs or more
  (of different output lengths or loads), aux_cpu_per_request and aux_cpu_per_step fitted to
  requests and steps (relative least squares, non-negative; no per-token term: with two runs the
  two terms solve exactly, so use three or more to see the error): the services work per request
  and per step (one publish, one read, one write per stream), not per token, so a run of long
  outputs at a high batch costs far less per token than one of short outputs; with one run,
  aux_cpu_per_token = CPU / output tokens, as before. The steps are counted in a simulation without
  the terms, where they are a little more than with them (steps that run slower batch more); the
  load generator's start-up is spread over the requests;
- kv_send_cpu_per_byte = (prefill server CPU - its steps' time in the simulation) / KV bytes it sent,
  over all the runs.

The low-load overheads are calibrated first without them, the loaded runs measured against that
calibration, and the low-load overheads calibrated again with the terms in place.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from splitserve.bench.loadgen.metrics import summarize
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.engine.block_manager import blocks_for
from splitserve.planner.fidelity import default_cluster, replayed_requests
from splitserve.planner.fit import fit_linear
from splitserve.planner.latency import Profile, StepOverheads, load_profile, save_profile
from splitserve.planner.simulator import ClusterSpec, Mode, Simulation, simulate


@dataclass(frozen=True)
class LowLoadRun:
    """One low-load run against the simulation with no step overheads (ms)."""

    name: str
    degree: int
    prompt_len: int
    real_ttft_p50: float
    hops: float
    prefill: float  # the profile's prefill of the prompt, alone
    real_tpot_p50: float
    sim_tpot_p50: float  # with decode_s = 0

    @property
    def in_cluster_prefill(self) -> float:
        return self.real_ttft_p50 - self.hops

    def describe(self) -> str:
        return (f"{self.name}: {self.prompt_len}-token prompts, TTFT P50 {self.real_ttft_p50:.1f} ms - hops "
                f"(and shared CPU) "
                f"{self.hops:.1f} = {self.in_cluster_prefill:.1f} ms against a prefill of {self.prefill:.1f} ms; "
                f"TPOT P50 {self.real_tpot_p50:.2f} ms against {self.sim_tpot_p50:.2f} ms simulated")


def _zeroed(profile: Profile, degree: int) -> Profile:
    return replace(profile, degrees={**profile.degrees, degree: replace(profile.degree(degree),
                                                                        cluster=StepOverheads())})


def measure_run(profile: Profile, cluster: ClusterSpec, records: list[RequestRecord], name: str) -> LowLoadRun:
    if cluster.prefill_degree != cluster.decode_degree:
        raise ValueError("calibrate on a run whose workers all have the same degree")
    degree = cluster.prefill_degree
    done = [r for r in records if r.ok]
    if not done or len({r.input_len for r in done}) != 1:
        raise ValueError(f"{name}: calibrate on a run of one prompt length (--workload fixed)")
    real = summarize(records)
    sim = summarize(simulate(_zeroed(profile, degree), cluster, replayed_requests(records)))
    prefill = profile.degree(degree).prefill.seconds([done[0].input_len]) * 1e3
    return LowLoadRun(name, degree, done[0].input_len, real.ttft_ms.p50, sim.ttft_ms.p50 - prefill, prefill,
                      real.tpot_ms.p50, sim.tpot_ms.p50)


def step_overheads(runs: Sequence[LowLoadRun]) -> StepOverheads:
    """One degree's overheads from its low-load runs (see the module's docstring)."""
    if len({r.degree for r in runs}) != 1:
        raise ValueError("calibrate one degree at a time")
    if len({r.prompt_len for r in runs}) == 1:
        factor = statistics.mean(r.in_cluster_prefill / r.prefill for r in runs)
        prefill_ms = 0.0
    else:
        (factor, prefill_ms), _ = fit_linear([(r.prefill, 1.0) for r in runs], [r.in_cluster_prefill for r in runs])
    decode_ms = statistics.mean(r.real_tpot_p50 - r.sim_tpot_p50 for r in runs)
    notes = (f"calibrated by splitserve.planner.calibrate: in-cluster prefill = {factor:.4f} x profile prefill "
             f"+ {prefill_ms:.1f} ms, decode + {decode_ms:.2f} ms per step; from " + "; ".join(r.describe() for r in runs))
    return StepOverheads(round(factor, 4), round(decode_ms / 1e3, 5), notes, prefill_s=round(prefill_ms / 1e3, 5))


SOURCE_MARK = "; cluster step overheads calibrated"


def calibrate(profile: Profile, runs: Sequence[LowLoadRun]) -> Profile:
    """The profile with the overheads of every degree the runs cover; its source says from what."""
    degrees = dict(profile.degrees)
    covered = sorted({r.degree for r in runs})
    for degree in covered:
        degrees[degree] = replace(degrees[degree], cluster=step_overheads([r for r in runs if r.degree == degree]))
    source = (f"{profile.source.split(SOURCE_MARK)[0]}{SOURCE_MARK} (degrees {', '.join(map(str, covered))}) by "
              f"`python -m splitserve.planner.calibrate` on {', '.join(r.name for r in runs)}")
    return replace(profile, degrees=degrees, source=source)


def load_run(path: Path, profile: Profile) -> LowLoadRun:
    data = json.loads(path.read_text())
    if len(data["points"]) != 1:
        raise ValueError(f"{path}: calibrate on a run of one rate")
    if data["config"].get("max_concurrency") != 1:
        print(f"{path}: not sent one at a time (--max-concurrency 1): queueing counts as overhead", file=sys.stderr)
    records = [RequestRecord.from_json(r) for r in data["points"][0]["records"]]
    cluster = default_cluster(data["config"].get("label"), int(profile.machine.get("num_cores", 2)))
    return measure_run(profile, cluster, records, str(path))


SHARED_SERVICES = ("gateway", "scheduler", "redis")


@dataclass(frozen=True)
class LoadedRun:
    """What a loaded run's CPU accounting says of the cluster's load-dependent CPU."""

    name: str
    requests: int  # admitted by the gateway, in the simulation (what the simulator charges)
    steps: int  # steps that emitted tokens, in the simulation without the load-dependent terms
    output_tokens: int
    shared_cpu_s: float  # gateway, scheduler, Redis and the load generator
    kv_bytes: int
    prefill_cpu_s: float  # the prefill server process
    prefill_steps_s: float  # its steps' CPU in the simulation, without the load-dependent terms

    @property
    def aux_cpu_per_token(self) -> float:
        return self.shared_cpu_s / self.output_tokens

    @property
    def kv_send_cpu_s(self) -> float:
        return self.prefill_cpu_s - self.prefill_steps_s

    def describe(self) -> str:
        return (f"{self.name}: shared services {self.shared_cpu_s:.2f} CPU-s for {self.requests} requests, "
                f"{self.steps} steps, {self.output_tokens} tokens "
                f"({self.aux_cpu_per_token * 1e3:.3f} ms per token); prefill server {self.prefill_cpu_s:.2f} "
                f"CPU-s - simulated steps {self.prefill_steps_s:.2f} s = "
                f"{self.kv_send_cpu_s:.2f} s for {self.kv_bytes / 1e9:.3f} GB of KV")


@dataclass(frozen=True)
class LoadTerms:
    """The load-dependent terms the loaded runs give (Overheads' fields of the same names)."""

    aux_cpu_per_request: float
    aux_cpu_per_step: float
    aux_cpu_per_token: float
    kv_send_cpu_per_byte: float
    fit: str = ""  # how well the shared services' terms fit the runs

    def describe(self) -> str:
        if self.aux_cpu_per_token:
            shared = f"{self.aux_cpu_per_token * 1e3:.3f} ms per token"
        else:
            shared = (f"{self.aux_cpu_per_request * 1e3:.2f} ms per request + "
                      f"{self.aux_cpu_per_step * 1e3:.3f} ms per step")
        kv = f"KV sends {self.kv_send_cpu_per_byte * 1e9:.2f} ns per byte"
        return f"shared services {shared}{self.fit}; {kv}"


def load_terms(runs: Sequence[LoadedRun]) -> LoadTerms:
    """Per request and per step from two runs or more, per token from one (the module's docstring)."""
    if not runs:
        raise ValueError("no loaded run")
    kv = max(0.0, sum(r.kv_send_cpu_s for r in runs) / sum(r.kv_bytes for r in runs))
    if len(runs) == 1:
        return LoadTerms(0.0, 0.0, runs[0].aux_cpu_per_token, kv)
    (per_request, per_step), error = fit_linear([(r.requests, r.steps) for r in runs],
                                                [r.shared_cpu_s for r in runs])
    fit = " (solved from 2 runs: no error to show)"
    if len(runs) > 2:
        fit = (f" (fitted to {len(runs)} runs: mean error {error.mean_rel_error:.1%}, "
               f"max {error.max_rel_error:.1%})")
    return LoadTerms(per_request, per_step, 0.0, kv, fit)


def without_load_terms(profile: Profile) -> Profile:
    return replace(profile, overheads=replace(profile.overheads, aux_cpu_per_request=0.0,
                                              aux_cpu_per_step=0.0, aux_cpu_per_token=0.0,
                                              kv_send_cpu_per_byte=0.0))


def measure_loaded(profile: Profile, run: Path, cpu: Path) -> LoadedRun:
    data, account = json.loads(run.read_text()), json.loads(cpu.read_text())
    cluster = default_cluster(data["config"].get("label"), int(profile.machine.get("num_cores", 2)))
    if cluster.mode is not Mode.DISAGGREGATED:
        raise ValueError(f"{run}: measure the load-dependent terms on a disaggregated run")
    records = [RequestRecord.from_json(r) for point in data["points"] for r in point["records"]]
    sim = Simulation(without_load_terms(profile), cluster, replayed_requests(records))
    sim.run()
    block_size = cluster.engine.block_size
    kv_bytes = sum(blocks_for(r.input_len, block_size) * block_size * profile.model.kv_bytes_per_token
                   for r in records if r.ok and r.completion_tokens > 1)
    tokens = sum(len(r.chunk_times_s) for r in records)
    if not tokens or not kv_bytes:
        raise ValueError(f"{run}: no output tokens or no KV sent: nothing to measure the load terms on")
    processes = account["processes_cpu_s"]
    if "prefill" not in processes:
        raise ValueError(f"{cpu}: no prefill server in the accounting")
    # CPU seconds of the steps: a worker on d cores keeps d torch threads busy while it steps.
    steps_cpu_s = sum(w.engine.busy_s * w.spec.degree.degree for w in sim.scheduler.takers)
    shared_cpu_s = sum(processes.get(k, 0.0) for k in SHARED_SERVICES) + account["client_cpu_s"]
    return LoadedRun(str(run), sim.machine.num_admitted, sim.machine.num_emitting_steps, tokens, shared_cpu_s,
                     kv_bytes, processes["prefill"], steps_cpu_s)


def with_load_terms(profile: Profile, terms: LoadTerms, runs: Sequence[LoadedRun]) -> Profile:
    notes = f"{profile.overheads.notes.split('; load-dependent')[0]}; load-dependent terms measured by " \
            f"splitserve.planner.calibrate: {terms.describe()}; from " + "; ".join(r.describe() for r in runs)
    return replace(profile, overheads=replace(
        profile.overheads, aux_cpu_per_request=round(terms.aux_cpu_per_request, 6),
        aux_cpu_per_step=round(terms.aux_cpu_per_step, 7),
        aux_cpu_per_token=round(terms.aux_cpu_per_token, 7),
        kv_send_cpu_per_byte=round(terms.kv_send_cpu_per_byte, 13), notes=notes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitserve.planner.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--run", type=Path, action="append", required=True,
                   help="a low-load `bench serve --output` file, labelled with its mode")
    p.add_argument("--loaded", type=Path, action="append", default=[],
                   help="a disaggregated `bench serve --output` file under load (with --cpu); "
                        "repeat for more runs")
    p.add_argument("--cpu", type=Path, action="append", default=[],
                   help="the loaded run's splitserve.planner.cpu_account file, one per --loaded, "
                        "in their order")
    p.add_argument("--write", action="store_true", help="write the overheads into the profile")
    args = p.parse_args(argv)
    profile = load_profile(args.profile)
    if len(args.loaded) != len(args.cpu):
        p.error("--loaded and --cpu go together, one --cpu per --loaded")
    if args.loaded:
        # The low-load overheads without the load terms first, so that the loaded runs are measured
        # against this calibration and not whatever the profile held; then again with the terms.
        profile = without_load_terms(profile)
        base = calibrate(profile, [load_run(path, profile) for path in args.run])
        loaded = [measure_loaded(base, run, cpu) for run, cpu in zip(args.loaded, args.cpu)]
        for run in loaded:
            print(run.describe())
        terms = load_terms(loaded)
        profile = with_load_terms(base, terms, loaded)
        print(terms.describe())
    calibrated = calibrate(profile, [load_run(path, profile) for path in args.run])
    for degree, d in sorted(calibrated.degrees.items()):
        c = d.cluster
        print(f"degree {degree}: prefill_factor {c.prefill_factor:.4f}, prefill_s {c.prefill_s * 1e3:.1f} ms, "
              f"decode_s {c.decode_s * 1e3:.2f} ms\n  {c.notes}")
    if args.write:
        save_profile(calibrated, args.profile)
        print(f"wrote {args.profile}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
