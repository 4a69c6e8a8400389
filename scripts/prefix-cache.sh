#!/usr/bin/env bash
# The shared-system-prompt workload (docs/benchmarks.md, "Prefix caching"): a fresh disaggregated
# 1 + 1 `splitserve up` with the prefix cache, then one with --no-prefix-caching, each swept by
# `splitserve bench serve` (4 system prompts of 1,024 tokens, 64-token questions, 32 output tokens,
# SLOs TTFT <= 2.5 s and TPOT <= 100 ms), one after the other in the same run.
#
#   scripts/prefix-cache.sh [OUT_DIR]
#
# Rates and requests per point: RATES_CACHE, RATES_NOCACHE, NUM_REQUESTS.
set -euo pipefail
out=${1:-prefix-cache}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
mkdir -p "$out"
. "$(dirname "$0")/lib/serve-bench.sh"

workload="--workload fixed --input-len 64 --output-len 32 --system-prompts 4 --system-prompt-len 1024
  --num-requests ${NUM_REQUESTS:-30} --seed 1 --ttft-slo 2.5 --tpot-slo 0.1"
serve_bench cache "$workload --rates ${RATES_CACHE:-0.4 1 2 3}"
serve_bench nocache "$workload --rates ${RATES_NOCACHE:-0.25 0.4 0.6}" --no-prefix-caching
