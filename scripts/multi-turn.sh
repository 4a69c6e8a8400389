#!/usr/bin/env bash
# Multi-turn conversations (docs/benchmarks.md, "Multi-turn conversations"): a fresh disaggregated
# 1 + 1 `splitserve up` with the prefix cache (prefill and decode side), one with decode-side reuse
# off (--no-decode-prefix-caching), and one with no cache at all (--no-prefix-caching), each swept
# by `splitserve bench serve --backend grpc` (so each turn repeats the real replies): conversations
# of 4 turns, 128 new tokens and 32 output tokens each, 1 s mean think time; SLOs TTFT <= 1 s and
# TPOT <= 100 ms.
#
#   scripts/multi-turn.sh [OUT_DIR]
#
# Knobs: RATES, NUM_REQUESTS, CONFIGS (default "cache no-decode-reuse nocache").
set -euo pipefail
out=${1:-multi-turn}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
mkdir -p "$out"
. "$(dirname "$0")/lib/serve-bench.sh"

workload="--backend grpc --url 127.0.0.1:$((port + 1)) --turns 4 --think-time 1 --input-len 128 --output-len 32
  --num-requests ${NUM_REQUESTS:-48} --seed 1 --ttft-slo 1 --tpot-slo 0.1 --rates ${RATES:-1 2 3}"
for config in ${CONFIGS:-cache no-decode-reuse nocache}; do
  case $config in
    cache) serve_bench cache "$workload" ;;
    no-decode-reuse) serve_bench no-decode-reuse "$workload" --no-decode-prefix-caching ;;
    nocache) serve_bench nocache "$workload" --no-prefix-caching ;;
  esac
done
