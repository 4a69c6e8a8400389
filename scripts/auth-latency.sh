#!/usr/bin/env bash
# What the cluster's authentication (or tracing) costs a request at low load, side by side in one run: for each
# round, each mode gets a fresh `splitserve up` and the same `splitserve bench serve` load; then the
# TTFT and TPOT P50 of every (mode, round) are printed, so that the spread between rounds of one mode
# shows the VM's drift next to the differences between modes.
#
#   scripts/auth-latency.sh [ROUNDS] [REQUESTS] [RATE] [OUT_DIR]
#   scripts/auth-latency.sh 2 40 0.5 /tmp/auth-latency
#
# Modes: insecure (up --insecure-cluster: no token, no TLS), token (the default), mtls (up
# --cluster-tls: token and mutual TLS); each with UCX KV, and mtls-grpc with the gRPC KV transport
# over mutual TLS. Not among the defaults: traced (token, and every service exports its OpenTelemetry
# spans to a collector that keeps nothing, scripts/tracing-cost.py --sink), e.g.
# MODES="token traced" scripts/auth-latency.sh 2 40 1 /tmp/tracing-latency.
# Extra `splitserve up` flags go in UP_ARGS, extra bench flags in BENCH_ARGS.
set -euo pipefail
rounds=${1:-2} requests=${2:-40} rate=${3:-0.5} out=${4:-auth-latency-results}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-18000}
sink_port=$((port + 317))
declare -A mode_args=([insecure]="--insecure-cluster" [token]="" [mtls]="--cluster-tls"
                      [mtls-grpc]="--cluster-tls --kv-transport grpc"
                      [traced]="--otlp-endpoint http://127.0.0.1:$sink_port")
modes=${MODES:-insecure token mtls mtls-grpc}
mkdir -p "$out"
if [[ " $modes " == *" traced "* ]]; then
  "$py" "$(dirname "$0")/tracing-cost.py" --sink "$sink_port" &
  sink=$!
  trap 'kill "$sink" 2> /dev/null || true' EXIT
fi
for round in $(seq "$rounds"); do
  for mode in $modes; do
    logs=$(mktemp -d)
    # shellcheck disable=SC2086
    "$py" -m splitserve.cli up ${mode_args[$mode]} --http-port "$port" --grpc-port $((port + 51)) \
        --log-dir "$logs" ${UP_ARGS:-} > "$logs/up.out" 2>&1 &
    up=$!
    until grep -q "splitserve is ready" "$logs/up.out"; do
      kill -0 "$up" 2> /dev/null || { cat "$logs/up.out"; exit 1; }
      sleep 1
    done
    # shellcheck disable=SC2086
    "$py" -m splitserve.cli bench serve --url "http://127.0.0.1:$port" --input-len 256 --output-len 32 \
        --rate "$rate" --num-requests "$requests" --seed "$round" --label "$mode" \
        --output "$out/$mode-$round.json" ${BENCH_ARGS:-} > "$out/$mode-$round.txt" 2>&1
    kill -TERM "$up"
    wait "$up" || true
  done
done
"$py" - "$out" <<'PY'
import json, pathlib, statistics, sys
rows = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    mode, _, rnd = path.stem.rpartition("-")
    report = json.loads(path.read_text())["points"][0]["report"]
    rows.setdefault(mode, []).append((int(rnd), report["ttft_ms"]["p50"], report["tpot_ms"]["p50"],
                                      report["num_ok"] if "num_ok" in report else report.get("completed")))
print(f"{'mode':<10}{'round':>6}{'TTFT P50 ms':>13}{'TPOT P50 ms':>13}")
for mode, runs in rows.items():
    for rnd, ttft, tpot, _ in sorted(runs):
        print(f"{mode:<10}{rnd:>6}{ttft:>13.1f}{tpot:>13.2f}")
    print(f"{mode:<10}{'median':>6}{statistics.median(r[1] for r in runs):>13.1f}"
          f"{statistics.median(r[2] for r in runs):>13.2f}")
PY
