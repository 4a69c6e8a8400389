#!/usr/bin/env bash
# The comparison with vLLM's CPU backend (docs/benchmarks.md, "Against vLLM"): for each preset
# workload (w1, w2, w3, which carry their SLOs) and each placement, start a fresh `splitserve up`,
# sweep `splitserve bench serve` over the workload's rates (Poisson arrivals for 60 s per rate, 90 s
# for w2, whose rates are low), stop it.
# `auto` is `up --mode auto --workload W`: the placement the planner predicts best for W's SLOs.
#
#   scripts/vllm-comparison.sh [OUT_DIR] [WORKLOADS] [PLACEMENTS]
#   scripts/vllm-comparison.sh docs/figures/vllm-comparison "w1 w2 w3" "auto disaggregated colocated"
#
# Rates per workload: RATES_W1, RATES_W2, RATES_W3 (defaults: vLLM's goodput and the target's).
# UP_FLAGS: more flags for every `splitserve up` (e.g. "--token-budget 1024"; auto sets its own).
set -euo pipefail
out=${1:-vllm-comparison} workloads=${2:-w1 w2 w3} placements=${3:-auto disaggregated colocated}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
declare -A rates=([w1]="${RATES_W1:-1.7 2.2}" [w2]="${RATES_W2:-0.28 0.56}" [w3]="${RATES_W3:-3.1 4.0}")
declare -A duration=([w1]=60 [w2]=90 [w3]=60)
mkdir -p "$out"
for workload in $workloads; do
  for placement in $placements; do
    logs=$(mktemp -d)
    flags=(--mode "$placement")
    # shellcheck disable=SC2206
    [ -n "${UP_FLAGS:-}" ] && flags+=(${UP_FLAGS})
    [ "$placement" = auto ] && flags+=(--workload "$workload")
    "$py" -m splitserve.cli up "${flags[@]}" --http-port "$port" --grpc-port $((port + 51)) \
        --log-dir "$logs" > "$logs/up.out" 2>&1 &
    up=$!
    until curl -sf "http://127.0.0.1:$port/ready" > /dev/null; do
      kill -0 "$up" 2> /dev/null || { cat "$logs/up.out"; exit 1; }
      sleep 1
    done
    grep -h "^auto: \|^starting " "$logs/up.out" || true
    # shellcheck disable=SC2086
    "$py" -m splitserve.cli bench serve --url "http://127.0.0.1:$port" --workload "$workload" \
        --rates ${rates[$workload]} --duration "${duration[$workload]}" --seed 1 --pause 5 \
        --label "$placement" --output "$out/$workload-$placement.json" || true
    kill -TERM "$up"
    wait "$up" || true
  done
done
