#!/usr/bin/env bash
# The pipelined decode step (docs/benchmarks.md, "The attention beside the GEMMs") in a real cluster:
# fresh `splitserve up` clusters with SPLITSERVE_DECODE_PIPELINE=1 and =0 in turn, ROUNDS times each
# (the order reversed every other round), each under the same long-context load, and what their
# decode steps and TPOT came to.
#
#   scripts/decode-pipeline-serve.sh OUT_DIR [ROUNDS] [UP_FLAGS...]
#   scripts/decode-pipeline-serve.sh out/pipeline-serve 2
#
# The load (BENCH, default: 512-token prompts, 1,024 tokens out, 0.5 req/s for 90 s) keeps ~20-30
# sequences of 512-1,536 tokens on the 1 + 1 decode server's one core, above the pipeline's threshold
# (16,128 tokens of context for the default model).
set -euo pipefail
out=$1 rounds=${2:-2}
shift $(($# < 2 ? $# : 2))
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
bench=${BENCH:---workload fixed --input-len 512 --output-len 1024 --rates 0.5 --duration 90 --seed 1}
mkdir -p "$out"
# shellcheck source=scripts/lib/serve-bench.sh
. "$(dirname "$0")/lib/serve-bench.sh"
for round in $(seq 1 "$rounds"); do
  order="1 0"
  [ $((round % 2)) -eq 0 ] && order="0 1"
  for setting in $order; do
    SPLITSERVE_DECODE_PIPELINE=$setting serve_bench "pipeline$setting-round$round" "$bench" "$@"
  done
done
"$py" - "$out" <<'PY' | tee "$out/summary.txt"
import json
import sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("pipeline*-round*.json")):
    point = json.loads(path.read_text())["points"][0]
    report = point["report"]
    steps = [s for s in point["engine_steps"] if s["kind"] == "decode" and s["steps"] >= 20]
    by_class = ", ".join(f"{s['batch']}: {s['mean_ms']:.1f} ms x{s['steps']}" for s in steps)
    print(f"{path.stem}: {report['completed']}/{report['num_requests']} done, TPOT P50 "
          f"{report['tpot_ms']['p50']:.1f} ms, mean {report['tpot_ms']['mean']:.1f}; "
          f"decode steps by batch class: {by_class}")
PY
