#!/bin/bash
# usage (from the repository root): docs/figures/in-worker/zen4-2026-12-07/ab.sh
cd "$(dirname "$0")"
for r in 1 2; do for sc in default 3000; do
  o=ab-$sc-$r
  if [ $sc = default ]; then ./run.sh $PWD/$o 2.2 colocated; else GOMP_SPINCOUNT=$sc ./run.sh $PWD/$o 2.2 colocated; fi
  echo "== $o"; grep -E "TTFT ms|TPOT ms|attainment" $o/bench.txt; grep -A5 "engine steps" $o/bench.txt | tail -5; head -4 $o/sched.txt
done; done
