"""How close the simulator comes to the real cluster: replay a `bench serve` run and compare.

    python -m splitserve.planner.fidelity docs/figures/goodput/chatbot-*.json \
        --slo chatbot=2,0.05 [--profile P] [--output fidelity.json]

A `bench serve --output` file keeps every request's record: when it was sent, its prompt and output
lengths. Each point is replayed through the simulator with exactly those requests (sent when the
real ones were sent), on the cluster its label names (disaggregated, colocated or chunked, with
`splitserve up`'s defaults, or the cluster flags given), and both sides are scored by the same
`summarize`. A run on shared system prompts replays its very prompts' block hashes, so the
simulated prefix cache sees what the real one saw. The bounds are the planner's fidelity target: SLO attainment within 10 percentage
points, TTFT and TPOT P50 and P90 within 20% of the real figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from splitserve.bench.loadgen.metrics import Report, Slo, summarize
from splitserve.bench.loadgen.prompts import PromptFactory, SharedPrefix
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.rescore import goodput_text
from splitserve.bench.loadgen.sweep import SweepGoodput, sweep_goodput
from splitserve.bench.loadgen.workloads import LengthDist, Workload
from splitserve.engine.block_manager import block_hashes
from splitserve.planner.latency import Profile, load_profile
from splitserve.planner.simulator import ClusterSpec, Mode, SimRequest, simulate, workload_requests

ATTAINMENT_BOUND_PP = 10.0  # percentage points
LATENCY_BOUND = 0.20  # relative to the real figure
LATENCIES = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")
METRICS = ("attainment", *LATENCIES)


@dataclass(frozen=True)
class Figures:
    """What one side of a point scored: attainment (fraction) and latency percentiles (ms)."""

    attainment: float
    ttft_p50: float | None
    ttft_p90: float | None
    tpot_p50: float | None
    tpot_p90: float | None

    @classmethod
    def of(cls, report: Report) -> Figures:
        if report.slo is None:
            raise ValueError("a comparison needs SLOs: the run recorded none, give --slo")
        return cls(report.slo.attainment, report.ttft_ms.p50, report.ttft_ms.p90,
                   report.tpot_ms.p50, report.tpot_ms.p90)


@dataclass(frozen=True)
class PointComparison:
    workload: str
    mode: str
    rate: float
    num_requests: int
    real: Figures
    sim: Figures

    def error(self, metric: str) -> float | None:
        """Attainment: simulated minus real, in percentage points; latencies: (sim - real) / real."""
        real, sim = getattr(self.real, metric), getattr(self.sim, metric)
        if real is None or sim is None:
            return None
        if metric == "attainment":
            return 100.0 * (sim - real)
        return (sim - real) / real

    def within(self, metric: str) -> bool:
        error = self.error(metric)
        bound = ATTAINMENT_BOUND_PP if metric == "attainment" else LATENCY_BOUND
        return error is not None and abs(error) <= bound + 1e-9

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "error": {m: self.error(m) for m in METRICS},
                "within": {m: self.within(m) for m in METRICS}}


@dataclass(frozen=True)
class RunComparison:
    """One `bench serve` file: its points, and the sweep goodput both sides give."""

    path: str
    target: float
    points: list[PointComparison]

    def goodput(self, side: str) -> SweepGoodput:
        return sweep_goodput([(c.rate, getattr(c, side).attainment) for c in self.points], self.target)

    @property
    def deciding(self) -> list[PointComparison]:
        """The real sweep's points up to its first failing rate: those that place the goodput."""
        failing = self.goodput("real").first_failing_rate
        return [c for c in self.points if failing is None or c.rate <= failing]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "target": self.target, "goodput": {
            side: self.goodput(side).goodput_rps for side in ("real", "sim")},
            "points": [c.to_json() for c in self.points]}


# -- replaying a run ------------------------------------------------------------------------------


def replayed_requests(records: Sequence[RequestRecord], factory: PromptFactory | None = None,
                      block_size: int = 16) -> list[SimRequest]:
    """The requests as the real client sent them: its send times and its lengths, and with the
    point's prompt factory (shared system prompts) its prompts' block hashes."""
    def hashes(r: RequestRecord) -> tuple[bytes, ...]:
        if factory is None:
            return ()
        own = r.input_len - factory.shared_prefix.length
        return tuple(block_hashes(factory.token_ids(r.index, own), block_size))

    return [SimRequest(r.index, r.send_s if r.send_s is not None else r.scheduled_s, r.input_len, r.output_len,
                       hashes(r)) for r in sorted(records, key=lambda r: r.index)]


def prompt_factory(config: dict[str, Any], point_index: int, point: dict[str, Any]) -> PromptFactory | None:
    """The factory that made a point's prompts, for runs whose prompts share system prompts (the
    only shared prefixes a replay rebuilds; a trace's or a conversation's are not replayed)."""
    shared = config.get("shared_prefix")
    if not shared:
        return None
    return PromptFactory(config["seed"], point_index, tuple(config["token_range"]), tuple(point["nonce"]),
                         SharedPrefix(shared["num_prompts"], shared["length"]))


def workload_of(config: dict[str, Any]) -> Workload:
    w = config["workload"]
    return Workload(w["name"], w.get("description", ""), LengthDist(**w["input"]), LengthDist(**w["output"]))


def generator_matches(config: dict[str, Any], rate: float, records: Sequence[RequestRecord]) -> bool:
    """Whether `workload_requests` (what `simulate` sends) gives these records' arrivals and lengths."""
    if config.get("duration_s") is not None:
        return False
    generated = workload_requests(workload_of(config), rate, config["seed"], burstiness=config["burstiness"],
                                  num_requests=config["num_requests"])
    real = sorted(records, key=lambda r: r.index)
    return len(generated) == len(real) and all(
        (g.input_len, g.output_len) == (r.input_len, r.output_len) and abs(g.arrival_s - r.scheduled_s) < 1e-6
        for g, r in zip(generated, real))


def slo_of(config: dict[str, Any], overrides: dict[str, tuple[float, float]]) -> Slo:
    """The run's own SLOs, unless its workload has an override (TTFT s, TPOT s)."""
    recorded = config.get("slo") or {}
    ttft, tpot = overrides.get(config["workload"]["name"], (recorded.get("ttft_s"), recorded.get("tpot_s")))
    return Slo(ttft, tpot, recorded.get("target", 0.9))


def compare_run(data: dict[str, Any], profile: Profile, cluster: ClusterSpec, slo: Slo) -> list[PointComparison]:
    """Every point of one `bench serve` document, real against simulated."""
    config, out = data["config"], []
    for index, point in enumerate(data["points"]):
        if "records" not in point:
            raise ValueError("the run was written with --no-records: there is nothing to replay")
        records = [RequestRecord.from_json(r) for r in point["records"]]
        requests = replayed_requests(records, prompt_factory(config, index, point), cluster.engine.block_size)
        simulated = simulate(profile, cluster, requests)
        out.append(PointComparison(config["workload"]["name"], cluster.mode.value, float(point["rate"]),
                                   len(records), Figures.of(summarize(records, slo)),
                                   Figures.of(summarize(simulated, slo))))
    return out


def default_cluster(label: str | None, num_cores: int) -> ClusterSpec:
    """`splitserve up --mode LABEL` with its defaults: 1 + 1 one-core workers, or one worker on all cores."""
    try:
        mode = Mode(label)
    except ValueError:
        raise ValueError(f"the run's label {label!r} names no mode: give --mode") from None
    if mode is Mode.DISAGGREGATED:
        return ClusterSpec(mode, 1, 1, num_cores // 2, num_cores - num_cores // 2)
    return ClusterSpec(mode, 1, 0, num_cores, num_cores)


# -- the table ------------------------------------------------------------------------------------


def _cell(c: PointComparison, metric: str) -> str:
    real, sim, error = getattr(c.real, metric), getattr(c.sim, metric), c.error(metric)
    if error is None:
        return "-"
    mark = "" if c.within(metric) else "**"
    if metric == "attainment":
        return f"{real:.0%} / {sim:.0%} ({mark}{error:+.0f}{mark})"
    return f"{real:.0f} / {sim:.0f} ({mark}{error:+.0%}{mark})"


def markdown_table(comparisons: Sequence[PointComparison]) -> str:
    head = ("| workload | mode | req/s | n | attainment real / sim (pp) | TTFT P50 ms | TTFT P90 ms "
            "| TPOT P50 ms | TPOT P90 ms |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        cells = " | ".join(_cell(c, m) for m in METRICS)
        lines.append(f"| {c.workload} | {c.mode} | {c.rate:g} | {c.num_requests} | {cells} |")
    return "\n".join(lines)


def summary_table(runs: Sequence[RunComparison]) -> str:
    """Per mode and metric, how many points meet the bound: all of them, and those that place the
    goodput (up to the real sweep's first failing rate)."""
    modes = list(dict.fromkeys(c.mode for r in runs for c in r.points))
    lines = ["| mode | points | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for mode in [*modes, "all"]:
        for which, pick in (("", lambda r: r.points), (", up to the first failing rate", lambda r: r.deciding)):
            rows = [c for r in runs for c in pick(r) if mode in ("all", c.mode)]
            counts = [f"{sum(c.within(m) for c in rows)}/{sum(c.error(m) is not None for c in rows)}"
                      for m in METRICS]
            lines.append(f"| {mode}{which} | {len(rows)} | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def goodput_table(runs: Sequence[RunComparison]) -> str:
    """Each sweep's goodput (req/s at its attainment target), real and simulated."""
    lines = ["| workload | mode | goodput real | goodput simulated |", "|---|---|---|---|"]
    for r in runs:
        cells = [goodput_text(r.goodput(side)) for side in ("real", "sim")]
        lines.append(f"| {r.points[0].workload} | {r.points[0].mode} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------


def _slo_override(text: str) -> tuple[str, tuple[float, float]]:
    try:
        workload, targets = text.split("=")
        ttft, tpot = (float(x) for x in targets.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slo {text!r}: expected WORKLOAD=TTFT_S,TPOT_S") from None
    return workload, (ttft, tpot)


def parser() -> argparse.ArgumentParser:
    from splitserve.commands.simulate import _add_cluster_args  # simulate's cluster flags, as `splitserve up`

    p = argparse.ArgumentParser(prog="python -m splitserve.planner.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="`bench serve --output` files with their records")
    p.add_argument("--profile", type=Path, default=None, help="latency profile (default: the shipped one)")
    p.add_argument("--slo", type=_slo_override, action="append", default=[], metavar="WORKLOAD=TTFT,TPOT",
                   help="score this workload's runs under these SLOs (seconds) instead of their own")
    p.add_argument("--output", type=Path, default=None, help="write every comparison as JSON here")
    _add_cluster_args(p)
    p.set_defaults(mode=None)  # default: the mode each run's label names, with up's default placement
    return p


def _cluster(args: argparse.Namespace, label: str | None, profile: Profile) -> ClusterSpec:
    if args.mode is None and label in {m.value for m in Mode}:
        cluster = default_cluster(label, int(profile.machine.get("num_cores", 2)))
        engine = replace(cluster.engine, token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
                         block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
                         enable_prefix_caching=args.prefix_caching)
        return replace(cluster, engine=engine, routing=args.routing)
    from splitserve.planner.cli_config import cluster_from_args

    if args.mode is None:
        raise ValueError(f"the run's label {label!r} names no mode: give --mode")
    return cluster_from_args(args, profile)[0]


def _warn_if_generated_differently(path: Path, config: dict[str, Any], data: dict[str, Any]) -> None:
    for point in data["points"]:
        records = [RequestRecord.from_json(r) for r in point.get("records", [])]
        if not generator_matches(config, float(point["rate"]), records):
            print(f"{path} at {point['rate']}: `simulate` would send other requests; replaying the recorded ones",
                  file=sys.stderr)


def run(args: argparse.Namespace) -> list[RunComparison]:
    from splitserve.planner.sweep import DEFAULT_PROFILE

    profile = load_profile(args.profile or DEFAULT_PROFILE)
    overrides, runs = dict(args.slo), []
    for path in args.inputs:
        data = json.loads(path.read_text())
        config = data["config"]
        _warn_if_generated_differently(path, config, data)
        slo = slo_of(config, overrides)
        points = compare_run(data, profile, _cluster(args, config.get("label"), profile), slo)
        runs.append(RunComparison(str(path), slo.target, points))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        runs = run(args)
    except (OSError, ValueError) as exc:
        print(f"python -m splitserve.planner.fidelity: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table([c for r in runs for c in r.points]))
    print()
    print(summary_table(runs))
    print()
    print(goodput_table(runs))
    if args.output is not None:
        args.output.write_text(json.dumps([r.to_json() for r in runs], indent=1) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
