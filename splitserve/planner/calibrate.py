"""The cluster's step overheads of a profile, calibrated on one low-load `bench serve` run per mode.

    python -m splitserve.planner.calibrate --profile P \
        --run docs/figures/planner/overhead-disaggregated.json \
        --run docs/figures/planner/overhead-colocated.json [--write]

A low-load run sends one request at a time (`bench serve --workload fixed --max-concurrency 1`),
so nothing queues and every gap between the cluster and the engine's own step times is overhead.
Each run is replayed through the simulator on the cluster its label names (`splitserve up`'s
default placement), first with that degree's overheads zeroed, then:

- prefill_factor = (real TTFT P50 - the hops) / the profile's prefill of the prompt, where the hops
  (gateway_s + rpc_s + reply_s) are the simulated TTFT P50 minus that prefill;
- decode_s = real TPOT P50 - simulated TPOT P50. With one request in the cluster every decode step
  is a batch-1 step and each adds decode_s once, so TPOT moves by exactly decode_s.

A disaggregated run calibrates its workers' degree from both servers (the factor from the prefill
server, decode_s from the decode server); a colocated run, its one worker's degree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from splitserve.bench.loadgen.metrics import summarize
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.planner.fidelity import default_cluster, replayed_requests
from splitserve.planner.latency import Profile, StepOverheads, load_profile, save_profile
from splitserve.planner.simulator import ClusterSpec, simulate


@dataclass(frozen=True)
class Calibration:
    """One degree's overheads, with the figures they came from (ms)."""

    degree: int
    run: str
    real_ttft_p50: float
    hops: float
    prefill: float  # the profile's prefill of the median prompt, alone
    real_tpot_p50: float
    sim_tpot_p50: float  # with decode_s = 0

    @property
    def prefill_factor(self) -> float:
        return (self.real_ttft_p50 - self.hops) / self.prefill

    @property
    def decode_s(self) -> float:
        return (self.real_tpot_p50 - self.sim_tpot_p50) / 1e3

    def overheads(self) -> StepOverheads:
        return StepOverheads(round(self.prefill_factor, 4), round(self.decode_s, 5), self.notes)

    @property
    def notes(self) -> str:
        return (f"calibrated on {self.run} (one request at a time): prefill_factor = (TTFT P50 "
                f"{self.real_ttft_p50:.1f} ms - hops {self.hops:.1f} ms) / prefill {self.prefill:.1f} ms; "
                f"decode_s = TPOT P50 {self.real_tpot_p50:.2f} ms - simulated {self.sim_tpot_p50:.2f} ms "
                "with no step overhead")


def _zeroed(profile: Profile, degrees: set[int]) -> Profile:
    changed = {k: replace(d, cluster=StepOverheads()) if k in degrees else d for k, d in profile.degrees.items()}
    return replace(profile, degrees=changed)


def calibrate_run(profile: Profile, cluster: ClusterSpec, records: list[RequestRecord], name: str) -> Calibration:
    if len({cluster.prefill_degree, cluster.decode_degree}) != 1:
        raise ValueError("calibrate a run whose workers all have the same degree")
    degree = cluster.prefill_degree
    done = [r for r in records if r.ok]
    if not done or len({r.input_len for r in done}) != 1:
        raise ValueError(f"{name}: calibrate on a run of one prompt length (--workload fixed)")
    real = summarize(records)
    sim = summarize(simulate(_zeroed(profile, {degree}), cluster, replayed_requests(records)))
    prefill = profile.degree(degree).prefill.seconds([done[0].input_len]) * 1e3
    return Calibration(degree, name, real.ttft_ms.p50, sim.ttft_ms.p50 - prefill, prefill,
                       real.tpot_ms.p50, sim.tpot_ms.p50)


def _load(path: Path) -> tuple[str | None, list[RequestRecord], int | None]:
    data = json.loads(path.read_text())
    if len(data["points"]) != 1:
        raise ValueError(f"{path}: calibrate on a run of one rate")
    records = [RequestRecord.from_json(r) for r in data["points"][0]["records"]]
    return data["config"].get("label"), records, data["config"].get("max_concurrency")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitserve.planner.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--run", type=Path, action="append", required=True,
                   help="a low-load `bench serve --output` file, labelled with its mode")
    p.add_argument("--write", action="store_true", help="write the overheads into the profile")
    args = p.parse_args(argv)
    profile = load_profile(args.profile)
    cores = int(profile.machine.get("num_cores", 2))
    for path in args.run:
        label, records, concurrency = _load(path)
        if concurrency != 1:
            print(f"{path}: not sent one at a time (--max-concurrency 1): queueing counts as overhead",
                  file=sys.stderr)
        c = calibrate_run(profile, default_cluster(label, cores), records, str(path))
        print(f"degree {c.degree}: prefill_factor {c.prefill_factor:.4f}, decode_s {c.decode_s * 1e3:.2f} ms "
              f"({c.notes})")
        profile = replace(profile, degrees={**profile.degrees, c.degree: replace(profile.degree(c.degree),
                                                                                 cluster=c.overheads())})
    if args.write:
        save_profile(profile, args.profile)
        print(f"wrote {args.profile}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
