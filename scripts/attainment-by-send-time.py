"""SLO attainment and latencies of a `bench serve` run's requests, in windows of their send time.

    .venv/bin/python scripts/attainment-by-send-time.py RUN.json 49 80 110

splits the run's (first point's) requests at 49, 80 and 110 s after the run started, and prints
one line per window, scored by the run's own SLOs.
"""

import itertools
import json
import sys
from pathlib import Path

from splitserve.bench.loadgen.metrics import Slo, summarize
from splitserve.bench.loadgen.records import RequestRecord


def main(path: str, *cuts: str) -> None:
    data = json.loads(Path(path).read_text())
    slo = Slo(**data["config"]["slo"])
    records = [RequestRecord.from_json(r) for r in data["points"][0]["records"]]
    edges = [0.0, *map(float, cuts), float("inf")]
    for low, high in itertools.pairwise(edges):
        part = [r for r in records if low <= r.scheduled_s < high]
        if part:
            rep = summarize(part, slo)
            end = min(high, max(r.scheduled_s for r in part))
            print(f"sent {low:5.0f}-{end:5.0f} s: {len(part):3d} requests, attainment {rep.slo.attainment:6.1%}, "
                  f"TTFT P50 {rep.ttft_ms.p50:5.0f} P90 {rep.ttft_ms.p90:5.0f} ms, "
                  f"TPOT P50 {rep.tpot_ms.p50:5.1f} P90 {rep.tpot_ms.p90:5.1f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:])
