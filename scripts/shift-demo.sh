#!/usr/bin/env bash
# A workload whose mix shifts mid-run, against one `splitserve up` cluster (docs/planner.md,
# "Re-planning online, on a shifting mix"):
#   phase 1: N1 decode-heavy requests (16 tokens in, 256 out) at R1 req/s;
#   phase 2, N1/R1 seconds later (when phase 1 is expected to have sent its last): N2 `code` requests
#   at R2 req/s.
# Both under TTFT 2 s / TPOT 50 ms. Writes OUT-1.json and OUT-2.json (bench serve) and OUT.up.log.
#
#   scripts/shift-demo.sh OUT "UP ARGS" R1 N1 R2 N2
#   scripts/shift-demo.sh docs/figures/planner/shift-adapt "--mode colocated --colocated 2 --cpus 0,1 \
#       --adapt --ttft-slo 2 --tpot-slo 0.05 --replan-interval 10 --workload-window 30" 1.0 50 3.6 600
set -euo pipefail
out=$1 upargs=$2 r1=$3 n1=$4 r2=$5 n2=$6 port=${PORT:-18400}
cd "$(dirname "$0")/.."
splitserve=.venv/bin/splitserve
logs=$(mktemp -d /tmp/shift-XXXX)
# shellcheck disable=SC2086
$splitserve up $upargs --http-port "$port" --grpc-port $((port + 51)) --log-dir "$logs" > "$logs/up.out" 2>&1 &
up=$!
trap 'kill -TERM "$up" 2> /dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/ready" > /dev/null; do
  kill -0 "$up" 2> /dev/null || { cat "$logs/up.out"; exit 1; }
  sleep 1
done
slo=(--ttft-slo 2 --tpot-slo 0.05 --attainment 0.9)
$splitserve bench serve --url "http://127.0.0.1:$port" --workload fixed --input-len 16 --output-len 256 \
    --rate "$r1" --num-requests "$n1" --seed 3 "${slo[@]}" --label "$(basename "$out")-decode-heavy" \
    --output "$out-1.json" > "$logs/phase1.out" 2>&1 &
phase1=$!
sleep "$(python3 -c "print($n1 / $r1)")"
$splitserve bench serve --url "http://127.0.0.1:$port" --workload code --rate "$r2" --num-requests "$n2" \
    --seed 4 "${slo[@]}" --label "$(basename "$out")-code" --output "$out-2.json" > "$logs/phase2.out" 2>&1
wait "$phase1"
grep -h "SLO" "$logs/phase1.out" "$logs/phase2.out"
kill -TERM "$up"
wait "$up" || true
trap - EXIT
cp "$logs/up.out" "$out.up.log"
echo "logs: $logs"
