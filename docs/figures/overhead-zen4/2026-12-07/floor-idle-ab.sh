#!/bin/bash
# A/B: hop floor at 0.3 s gaps, as is / with the idle state disabled (vCPU polls) / with SCHED_IDLE spinners
cd "$(git rev-parse --show-toplevel)"
run() { .venv/bin/python scripts/hop-floor.py --samples 40 --gap 0.3 2>&1 | tail -8; }
for round in 1 2; do
  echo "== round $round: as is"; run
  echo "== round $round: idle state disabled"
  for c in 0 1; do echo 1 > /sys/devices/system/cpu/cpu$c/cpuidle/state1/disable; done
  run
  for c in 0 1; do echo 0 > /sys/devices/system/cpu/cpu$c/cpuidle/state1/disable; done
  echo "== round $round: SCHED_IDLE spinners"
  for c in 0 1; do taskset -c $c chrt --idle 0 python3 -c "while True: pass" & done
  sleep 0.5; run
  kill %1 %2; wait 2>/dev/null
done
