"""Each worker's decode steps under load against the engine alone at the same batch: issue 17's point 1
(docs/benchmarks.md, "In-worker step time").

    .venv/bin/python scripts/step-vs-alone.py SERVE.json ALONE.json [ALONE.json ...]

SERVE.json is `splitserve bench serve --output`'s: each point's `engine_steps`, the steps every worker
ran while the point's load ran, mean wall time per batch class (1, 2, 3-4, 5-8, ...), and the class's
mean batch (its tokens over its steps). Each ALONE.json is the stdout of `splitserve bench latency
--batch ...` (--batch is needed) on the worker's cores and threads: the engine alone's mean decode step
at each batch it was given, read at the class's mean batch by straight lines between them (a batch
outside them gets none). Give one taken before the load and one after, in the same hour: the VM drifts 10-20%
between runs, so the two bound the ratio.

Prints, per point and worker, each decode batch class with at least --min-steps steps: its mean step,
its mean batch, the engine alone's step there (per ALONE.json), and their ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def alone_at(by_batch: dict[str, dict], batch: float) -> float | None:
    """The engine alone's mean decode step at batch, between the two batches it was timed at
    around it (None outside them)."""
    points = sorted((int(b), row["mean"]) for b, row in by_batch.items())
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if b0 <= batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    return points[0][1] if batch == points[0][0] else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("serve", type=Path, help="bench serve's JSON (--output)")
    p.add_argument("alone", type=Path, nargs="+", help="bench latency's JSON, once or more (before, after)")
    p.add_argument("--min-steps", type=int, default=20,
                   help="leave out classes with fewer steps (default: 20)")
    args = p.parse_args()
    alone = [json.loads(path.read_text())["decode_step_ms_by_batch"] for path in args.alone]
    for point in json.loads(args.serve.read_text())["points"]:
        rows: dict[str, list[str]] = {}
        for s in point.get("engine_steps") or []:
            if s["kind"] != "decode" or s["steps"] < args.min_steps:
                continue
            batch = s["tokens"] / s["steps"]
            refs = [alone_at(a, batch) for a in alone]
            ratios = "/".join(f"{s['mean_ms'] / r:.2f}x" if r else "-" for r in refs)
            refs_text = "/".join(f"{r:.1f}" if r else "-" for r in refs)
            rows.setdefault(s["worker"], []).append(
                f"{s['batch']}: {s['mean_ms']:.1f} ms at {batch:.1f} (alone {refs_text}) {ratios}")
        attained = ((point.get("report") or {}).get("slo") or {}).get("attainment")
        slo = f", SLO attainment {attained:.1%}" if attained is not None else ""
        print(f"rate {point['rate']} req/s{slo}")
        for worker, cells in rows.items():
            print(f"  {worker}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
