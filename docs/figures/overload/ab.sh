#!/usr/bin/env bash
# Overload past decode memory (docs/benchmarks.md, "Overload: KV that waits for decode memory"): fresh
# `splitserve up` clusters (1 + 1) from two trees in turn, ROUNDS times each (the order reversed every
# other round), each under the same long-context load, then what their logs say: KV leases that ran
# out, requests run more than once, and requests that failed.
#
#   docs/figures/overload/ab.sh OUT_DIR BEFORE_TREE AFTER_TREE [ROUNDS]
#
# Each tree runs as `python -m splitserve.cli` from its own folder (a `git worktree` of the commit
# before, and this checkout), with this checkout's virtual environment. (The figures of 2026-12-07
# came from a copy of this script that started and stopped each cluster itself, with `pkill`, rather
# than through scripts/lib/serve-bench.sh.)
set -euo pipefail
out=$1 before=$2 after=$3 rounds=${4:-2}
py=${PYTHON:-$PWD/.venv/bin/python}  # not realpath: the link is what makes it the venv
port=${PORT:-18000}
bench=${BENCH:---workload fixed --input-len 512 --output-len 1024 --rates 1.0 --duration 90 --seed 1}
mkdir -p "$out"
out=$(realpath "$out")
# shellcheck source=scripts/lib/serve-bench.sh
. "$(dirname "$0")/../../../scripts/lib/serve-bench.sh"
run() {  # serve_bench from the tree's own folder, so that `python -m splitserve.cli` is that tree's
  local label=$1 tree=$2
  (cd "$tree" && serve_bench "$label" "$bench")
}
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) -eq 1 ]; then order="before after"; else order="after before"; fi
  for which in $order; do
    if [ "$which" = before ]; then run "before-round$round" "$before"; else run "after-round$round" "$after"; fi
  done
done
"$py" - "$out" <<'PY' | tee "$out/summary.txt"
import json
import sys
from collections import Counter
from pathlib import Path


def events(log: Path, name: str) -> list[dict]:
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")] if log.exists() else []
    return [x for x in lines if x.get("event") == name]


out = Path(sys.argv[1])
for path in sorted(out.glob("*-round*.json")):
    report = json.loads(path.read_text())["points"][0]["report"]
    logs = out / f"logs-{path.stem}"
    expired = len(events(logs / "prefill-0.log", "kv lease expired before any pull"))
    runs = Counter(e["request_id"] for e in events(logs / "scheduler.log", "assigned to prefill"))
    again = sum(1 for n in runs.values() if n > 1)
    failed = Counter(e["error"][:40] for e in events(logs / "scheduler.log", "request failed"))
    print(f"{path.stem}: {report['completed']}/{report['num_requests']} completed; leases run out {expired}; "
          f"requests prefilled more than once {again} (prefills {sum(runs.values())}); failed {dict(failed)}; "
          f"TTFT P50 {report['ttft_ms']['p50'] / 1000:.1f} s, P99 {report['ttft_ms']['p99'] / 1000:.1f} s; "
          f"TPOT P50 {report['tpot_ms']['p50']:.1f} ms; {report['duration_s']:.0f} s; "
          f"output {report['output_token_throughput']:.1f} tok/s")
PY
