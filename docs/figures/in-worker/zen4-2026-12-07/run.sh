#!/bin/bash
# usage: run.sh OUT [RATE] [MODE]: a fresh cluster under W1, the worker's threads accounted over 30 s
# (sched.py); with PYSPY=1 also py-spy's raw stacks of each worker
set -u
out=$1; rate=${2:-2.2}; mode=${3:-colocated}
cd "$(git rev-parse --show-toplevel)"; py=.venv/bin/python; port=18500; mkdir -p $out
$py -m splitserve.cli up --mode $mode --http-port $port --grpc-port $((port+1)) --scheduler-port $((port+2)) --log-dir $out/logs > $out/up.txt 2>&1 &
up=$!
until grep -qs "splitserve is ready" $out/up.txt; do kill -0 $up 2>/dev/null || { cat $out/up.txt; exit 1; }; sleep 0.5; done
sleep 2
$py -m splitserve.cli bench serve --url http://127.0.0.1:$port --workload w1 --rates $rate --duration 50 --seed 1 --output $out/serve.json > $out/bench.txt 2>&1 &
bench=$!
sleep 10
ps -eo pid,args | grep -E "splitserve" | grep -v grep > $out/ps.txt
w=$(pgrep -f "splitserve.cli --log-json (colocated|decode|prefill)" | head -1); python3 docs/figures/in-worker/zen4-2026-12-07/sched.py $w 30 > $out/sched.txt &
[ -n "${PYSPY:-}" ] && for w in $(pgrep -f "splitserve.cli --log-json (colocated|decode|prefill)" ); do
  ${PYSPY_BIN:-py-spy} record --idle --threads --nonblocking --rate 250 --format raw -o $out/worker-$w.raw --pid $w --duration 30 > $out/pyspy-$w.txt 2>&1 &
done
wait $bench
kill -TERM $up; wait $up
