#!/bin/bash
# two fresh 1+1 clusters, ttft-hops each; the bare floor between
cd "$(git rev-parse --show-toplevel)"; py=.venv/bin/python; out=${OUT:-/tmp/hops}; mkdir -p $out
for r in 1 2; do
  $py -m splitserve.cli up --http-port 18600 --grpc-port 18601 --scheduler-port 18602 --log-dir $out/hlogs$r > $out/hup$r.txt 2>&1 &
  up=$!
  until grep -qs "splitserve is ready" $out/hup$r.txt; do sleep 0.5; done; sleep 2
  echo "== cluster $r"; $py scripts/ttft-hops.py --address 127.0.0.1:18601 --requests 16 2>&1 | tail -12
  kill -TERM $up; wait $up
  echo "== floor $r"; $py scripts/hop-floor.py --samples 40 --gap 0.3 2>&1 | tail -5
done
