#!/usr/bin/env bash
# Replay of a Mooncake trace (docs/benchmarks.md, "Trace replay"): a fresh disaggregated 1 + 1
# `splitserve up` with the prefix cache, then one with --no-prefix-caching, each swept by
# `splitserve bench serve --trace` over the trace's first requests, lengths scaled to this machine.
#
#   TRACE=conversation_trace.jsonl scripts/trace-replay.sh [OUT_DIR]
#
# TRACE is a trace in the Mooncake FAST'25 format, e.g. FAST25-release/traces/conversation_trace.jsonl
# of github.com/kvcache-ai/Mooncake. Knobs: RATES, NUM_REQUESTS, LENGTH_SCALE, TTFT_SLO, TPOT_SLO,
# CONFIGS (default "cache nocache").
set -euo pipefail
out=${1:-trace-replay}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
: "${TRACE:?give TRACE=path/to/trace.jsonl}"
mkdir -p "$out"
. "$(dirname "$0")/lib/serve-bench.sh"

workload="--trace $TRACE --trace-length-scale ${LENGTH_SCALE:-0.05} --num-requests ${NUM_REQUESTS:-120}
  --ttft-slo ${TTFT_SLO:-5} --tpot-slo ${TPOT_SLO:-0.1} --rates ${RATES:-0.5 1 2}"
for config in ${CONFIGS:-cache nocache}; do
  case $config in
    cache) serve_bench cache "$workload" ;;
    nocache) serve_bench nocache "$workload" --no-prefix-caching ;;
  esac
done
