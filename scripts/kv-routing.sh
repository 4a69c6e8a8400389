#!/usr/bin/env bash
# KV-aware routing against least-loaded placement (docs/benchmarks.md, "KV-aware routing"): a fresh
# `splitserve up --prefill 2 --decode 1` with each `--routing`, alternated once per RUNS label in one run,
# each swept by `splitserve bench serve` on shared system prompts (8 of 1,024 tokens, 64-token
# questions, 32 output tokens, SLOs TTFT <= 2.5 s and TPOT <= 100 ms). Each server's KV cache
# (--kv-cache-gb 0.15, about 6 system prompts) holds less than the whole working set: placement
# decides what each one keeps.
#
#   scripts/kv-routing.sh [OUT_DIR]
#
# Knobs: RATES, NUM_REQUESTS, RUNS (the run labels, default "1 2"), KV_CACHE_GB.
set -euo pipefail
out=${1:-kv-routing}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
mkdir -p "$out"
. "$(dirname "$0")/lib/serve-bench.sh"

workload="--workload fixed --input-len 64 --output-len 32 --system-prompts 8 --system-prompt-len 1024
  --num-requests ${NUM_REQUESTS:-48} --seed 1 --ttft-slo 2.5 --tpot-slo 0.1 --rates ${RATES:-0.5 1 1.5}"
for run in ${RUNS:-1 2}; do
  for routing in kv least-loaded; do
    serve_bench "run$run-$routing" "$workload" --prefill 2 --decode 1 --routing "$routing" \
      --kv-cache-gb "${KV_CACHE_GB:-0.15}"
  done
done
