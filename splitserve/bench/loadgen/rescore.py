"""`splitserve bench rescore`: the goodput of saved runs under other SLOs, without running again.

A `bench serve --output` file keeps every request's record, and attainment is a pure function of
the records and the SLOs. This re-scores each file's sweep for every (TTFT SLO, TPOT SLO) pair
given and prints the goodput of each run side by side: where one mode wins, and where it loses.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from splitserve.bench.loadgen.metrics import Slo, summarize
from splitserve.bench.loadgen.records import RequestRecord
from splitserve.bench.loadgen.sweep import SweepGoodput, sweep_goodput


def load_points(path: Path) -> tuple[str, list[tuple[float, list[RequestRecord]]]]:
    data = json.loads(path.read_text())
    points = []
    for point in data["points"]:
        if "records" not in point:
            raise ValueError(f"{path}: written with --no-records; nothing to re-score")
        points.append((float(point["rate"]), [RequestRecord.from_json(r) for r in point["records"]]))
    return data["config"].get("label") or path.stem, points


def rescore(points: list[tuple[float, list[RequestRecord]]], slo: Slo) -> tuple[SweepGoodput, list[float]]:
    """The sweep goodput under slo, and the attainment at each rate (in the points' order)."""
    attainments = [summarize(records, slo).slo.attainment for _, records in points]
    return sweep_goodput([(rate, a) for (rate, _), a in zip(points, attainments)], slo.target), attainments


def goodput_text(sweep: SweepGoodput) -> str:
    if sweep.goodput_rps is None:
        return f"<{sweep.first_failing_rate:g}"
    return f"{sweep.goodput_rps:.2f}" + ("+" if sweep.lower_bound_only else "")


def run(args) -> int:
    runs = [load_points(path) for path in args.inputs]
    labels = [label for label, _ in runs]
    rows: list[dict[str, Any]] = []
    print(f"goodput (req/s at {args.attainment:.0%} attainment; '+' = every rate passed, '<r' = even r failed)")
    print("\t".join(["TTFT SLO s", "TPOT SLO s", *labels]))
    for ttft, tpot in itertools.product(args.ttft_slo, args.tpot_slo):
        slo = Slo(ttft, tpot, args.attainment)
        results = [rescore(points, slo) for _, points in runs]  # labels may repeat: keep the order
        print("\t".join([f"{ttft:g}", f"{tpot:g}", *(goodput_text(sweep) for sweep, _ in results)]))
        rows.append({"ttft_s": ttft, "tpot_s": tpot, "target": args.attainment, "runs": [
            {"label": label, "file": str(path), "sweep": sweep.to_json(),
             "rates": [rate for rate, _ in points], "attainment": attainments}
            for path, (label, points), (sweep, attainments) in zip(args.inputs, runs, results)]})
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0
