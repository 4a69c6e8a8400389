#!/bin/bash
# Scratch (not kept), as run for docs/benchmarks.md ("In-worker step time", Zen 4): the services'
# autogroups at NICE once the cluster is ready. Run alternately with NICE 0 and 10, twice each.
# usage: nice-ab.sh TREE OUT NICE  (colocated x2 W1 at 2.2 2.7; services' autogroups at NICE; client in its own)
cd $1; export PYTHONPATH=$PWD
logs=$(mktemp -d)
setsid .venv/bin/python -m splitserve.cli up --mode colocated --http-port 18000 --grpc-port 18051 --log-dir $logs > $logs/up.out 2>&1 &
up=$!
until curl -sf http://127.0.0.1:18000/ready > /dev/null; do sleep 1; done
for pid in $(pgrep -f "splitserve.cli --log-json (gateway|scheduler)") $(pgrep -f redis-server); do
  echo $3 > /proc/$pid/autogroup; echo "$pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-60) $(cat /proc/$pid/autogroup)"
done
setsid .venv/bin/python -m splitserve.cli bench serve --url http://127.0.0.1:18000 --workload w1 --rates 2.2 2.7 --duration 60 --seed 1 --pause 5 --output $2.json > $2.log 2>&1
kill -TERM $up; wait $up
