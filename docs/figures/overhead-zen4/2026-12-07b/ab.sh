#!/bin/bash
# alternate A (SS_YIELD=0) and B (SS_YIELD=1), $1 rounds, $2 requests each
for r in $(seq 1 $1); do
  for v in 0 1; do
    rm -f /tmp/stamps.jsonl
    SS_YIELD=$v /tmp/runone.sh /work/scratch/wt $2 > /dev/null 2>&1
    cp /tmp/stamps.jsonl /tmp/ab/stamps-$v-$r.jsonl; cp /tmp/client.json /tmp/ab/client-$v-$r.json
  done
done
