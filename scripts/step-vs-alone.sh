#!/usr/bin/env bash
# Issue 17's point 1 within one hour (docs/benchmarks.md, "In-worker step time"): the engine alone on
# a worker's cores, then a fresh `splitserve up` under a preset workload's load, then the engine alone
# again, and each worker's decode steps under the load against the two (scripts/step-vs-alone.py).
#
#   scripts/step-vs-alone.sh OUT_DIR WORKLOAD "RATES" CPUS THREADS [UP_FLAGS...]
#   scripts/step-vs-alone.sh out/colocated w1 "2.2 2.7" 0,1 2 --mode colocated
#   scripts/step-vs-alone.sh out/disaggregated w1 "1.0 1.4" 1 1 --mode disaggregated
#   (on two cores: up puts the 1 + 1 decode server on core 1)
#
# CPUS and THREADS are the worker's whose steps are read (bench latency --cpus --threads). The
# engine alone decodes the workload's lengths at BATCHES (default "1 2 4 8 16 32"; W3 under load
# reaches 48-64), --repeat 3: each such run prefills every batch five times (two warm-ups).
set -euo pipefail
out=$1 workload=$2 rates=$3 cpus=$4 threads=$5
shift 5
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
# The preset's lengths, as bench serve's --workload takes them (splitserve/bench/loadgen/workloads.py).
lengths=$("$py" -c '
import sys
from splitserve.bench.loadgen.workloads import PRESETS
if sys.argv[1] not in PRESETS:
    sys.exit("WORKLOAD must be one of " + ", ".join(PRESETS) + f", not {sys.argv[1]!r}")
print(PRESETS[sys.argv[1]].input_len, PRESETS[sys.argv[1]].output_len)' "$workload")
read -r input output <<< "$lengths"
mkdir -p "$out"
alone() {
  # shellcheck disable=SC2086
  "$py" -m splitserve.cli bench latency --cpus "$cpus" --threads "$threads" --input-len "$input" \
      --output-len "$output" --repeat 3 --batch ${BATCHES:-1 2 4 8 16 32} > "$out/alone-$1.json"
}
alone before
# shellcheck source=scripts/lib/serve-bench.sh
. "$(dirname "$0")/lib/serve-bench.sh"
# (|| true: a failed sweep still stops its cluster and times the engine alone after it)
serve_bench serve "--workload $workload --rates $rates --duration 60 --seed 1 --pause 5" "$@" || true
alone after
"$py" scripts/step-vs-alone.py "$out/serve.json" "$out/alone-before.json" "$out/alone-after.json" \
    | tee "$out/steps.txt"
