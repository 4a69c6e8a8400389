#!/usr/bin/env bash
# One workload's goodput comparison: for each mode, start a fresh local cluster with `splitserve up`,
# sweep `splitserve bench serve` over the rates, stop the cluster; then overlay the sweeps in one plot.
#
#   scripts/goodput-sweep.sh WORKLOAD "RATES" TTFT_SLO TPOT_SLO [REQUESTS] [OUT_DIR] [MODES]
#   scripts/goodput-sweep.sh chatbot "0.5 1 1.5 2" 1.0 0.06 40 docs/figures/goodput
#
# Modes default to "disaggregated colocated chunked". Extra `splitserve up` flags go in UP_ARGS.
set -euo pipefail
workload=$1 rates=$2 ttft=$3 tpot=$4 requests=${5:-40} out=${6:-goodput-results}
modes=${7:-disaggregated colocated chunked}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
mkdir -p "$out"
for mode in $modes; do
  logs=$(mktemp -d)
  # shellcheck disable=SC2086
  "$py" -m splitserve.cli up --mode "$mode" --http-port "$port" --grpc-port $((port + 51)) \
      --log-dir "$logs" ${UP_ARGS:-} > "$logs/up.out" 2>&1 &
  up=$!
  until curl -sf "http://127.0.0.1:$port/ready" > /dev/null; do
    kill -0 "$up" 2> /dev/null || { cat "$logs/up.out"; exit 1; }
    sleep 1
  done
  # shellcheck disable=SC2086
  "$py" -m splitserve.cli bench serve --url "http://127.0.0.1:$port" --workload "$workload" \
      --rates $rates --num-requests "$requests" --ttft-slo "$ttft" --tpot-slo "$tpot" --seed 1 \
      --label "$mode" --output "$out/$workload-$mode.json" || true
  kill -TERM "$up"
  wait "$up" || true
done
"$py" -m splitserve.cli bench plot "$out/$workload"-*.json --output "$out/$workload.png" \
    --title "$workload: TTFT SLO ${ttft}s, TPOT SLO ${tpot}s"
