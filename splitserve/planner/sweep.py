"""A simulated `bench serve` run: one simulation per rate, reported and written exactly as
`bench serve` reports and writes a run against a real cluster (splitserve/bench/loadgen/run.py).

The JSON is a `splitserve-bench-serve/1` document, so `bench plot`, `bench rescore` and
`bench timeline` read it like a measured one; its backend is `simulate`, its url the profile, and a
`simulation` section says which cluster was simulated.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from splitserve.bench.loadgen.config import ServeConfig
from splitserve.bench.loadgen.metrics import format_report, summarize
from splitserve.bench.loadgen.run import PointResult, result_json
from splitserve.common.cpuinfo import GENERATION_FIELDS, processor_generation, processor_name
from splitserve.planner.latency import Profile
from splitserve.planner.simulator import ClusterSpec, serve_requests, simulate

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = PROFILES_DIR / "cpu-2core.json"  # the Sapphire Rapids VM the project was built on


log = structlog.get_logger(__name__)


def _same_processor(machine: dict[str, Any], name: str, generation: dict[str, str]) -> bool:
    """Whether a profile's machine is this processor: the same model name, and the same vendor,
    family and model wherever the profile records them (a VM's name alone can cover generations)."""
    return (machine.get("device") == "cpu" and machine.get("processor") == name
            and all(str(machine[key]) == generation.get(key) for key in GENERATION_FIELDS if key in machine))


@functools.cache
def machine_profile() -> Path:
    """The shipped CPU profile of this machine type: one measured on this processor (its
    /proc/cpuinfo model name, and its vendor, family and model where the profile records them), one
    of its core count first, then the one that records more of those fields; DEFAULT_PROFILE, with
    a warning, where none was."""
    name, generation, cores = processor_name(), processor_generation(), os.cpu_count()
    matches = []
    for path in sorted(PROFILES_DIR.glob("*.json")):
        machine = json.loads(path.read_text()).get("machine", {})
        if _same_processor(machine, name, generation):
            recorded = sum(key in machine for key in GENERATION_FIELDS)
            matches.append((machine.get("num_cores") != cores, -recorded, path.name, path))
    if matches:
        return min(matches)[-1]
    log.warning("no shipped planner profile was measured on this processor; planning on another "
                "machine's, whose step times may be far from this one's: measure this machine's with "
                "`splitserve profile` and pass it as --profile (up: --plan-profile)",
                processor=name, **generation, profile=DEFAULT_PROFILE.name)
    return DEFAULT_PROFILE


@dataclass(frozen=True)
class SimulatedRun:
    profile: Profile
    cluster: ClusterSpec
    serve: ServeConfig  # the `bench serve` run being simulated (backend: simulate)


def simulate_point(run: SimulatedRun, rate: float) -> PointResult:
    serve = run.serve
    requests = serve_requests(serve, rate, run.cluster.engine.block_size)
    records = simulate(run.profile, run.cluster, requests)
    return PointResult(rate, (), summarize(records, serve.slo), records)


def simulation_json(run: SimulatedRun) -> dict[str, Any]:
    cluster = asdict(run.cluster)
    cluster["mode"] = run.cluster.mode.value
    return {"cluster": cluster, "describe": run.cluster.describe(), "profile_source": run.profile.source,
            "parallelism": run.profile.parallelism}


def run_sweep(run: SimulatedRun, print_reports: bool) -> dict[str, Any]:
    """Every rate of the run, in order; returns the `bench serve` JSON document with a simulation part."""
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    points = []
    for rate in run.serve.rates:
        if not math.isfinite(rate) and run.serve.num_requests is None:
            raise ValueError("an infinite rate needs --num-requests")
        points.append(simulate_point(run, rate))
        if print_reports:
            print(format_report(points[-1].report, _title(run, rate)), flush=True)
    result = result_json(run.serve, run.profile.model.name, points, started_at)
    result["simulation"] = simulation_json(run)
    return result


def _title(run: SimulatedRun, rate: float) -> str:
    label = f"{run.serve.label}: " if run.serve.label else ""
    return f"{label}{run.serve.workload.name} at {rate:g} req/s, simulated on {run.cluster.describe()}"


def write_outputs(run: SimulatedRun, result: dict[str, Any], as_json: bool) -> None:
    serve = run.serve
    if as_json:
        print(json.dumps(result, indent=1))
    elif result["sweep"] is not None and len(result["points"]) > 1:
        from splitserve.bench.loadgen.run import _goodput_text  # the same sentence as bench serve's

        print(f"sweep goodput: {_goodput_text(result['sweep'])}", flush=True)
    if serve.output is not None:
        serve.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {serve.output}", file=sys.stderr)
    if serve.plot is not None:
        from splitserve.bench.loadgen.plot import Sweep, plot_sweeps

        plot_sweeps([Sweep.from_json(result, serve.label or run.cluster.mode.value)], serve.plot)
        print(f"wrote {serve.plot}", file=sys.stderr)
