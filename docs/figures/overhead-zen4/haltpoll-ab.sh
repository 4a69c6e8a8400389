#!/bin/bash
# alternate guest_halt_poll_ns between 0 (the VM's setting) and 200000 (the kernel's default), a fresh
# splitserve up (1 + 1) each, scripts/ttft-hops.py --requests 16 against it
set -u
out=$1; shift
orig=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)
trap 'echo $orig > /sys/module/haltpoll/parameters/guest_halt_poll_ns' EXIT
cd /work/snap1
py=.venv/bin/python
port=18400
mkdir -p "$out"
i=0
for poll in "$@"; do
  i=$((i+1))
  echo $poll > /sys/module/haltpoll/parameters/guest_halt_poll_ns
  label="r$i-poll$poll"
  PYTHONPATH=$PWD $py -m splitserve.cli up --http-port $port --grpc-port $((port+1)) --scheduler-port $((port+2)) --log-dir "$out/logs-$label" > "$out/up-$label.txt" 2>&1 &
  up=$!
  until grep -qs "splitserve is ready" "$out/up-$label.txt"; do kill -0 $up 2>/dev/null || { cat "$out/up-$label.txt"; exit 1; }; sleep 0.5; done
  sleep 3
  echo "== $label $(date +%T) poll_ns=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)" | tee -a "$out/hops.txt"
  PYTHONPATH=$PWD $py scripts/ttft-hops.py --address 127.0.0.1:$((port+1)) --requests 16 2>&1 | grep -v '^{' | tee -a "$out/hops.txt"
  kill -TERM $up; wait $up
done
