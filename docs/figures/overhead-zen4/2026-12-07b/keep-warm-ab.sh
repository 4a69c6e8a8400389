#!/bin/bash
# The bare hand-offs after 0.3 s idle, as they are (A) and with each process kept busy every 10 ms
# (B: its event loop wakes, the gRPC client calls the server, the Redis writer PINGs), in turn; then a
# raw asyncio TCP ping-pong between two processes after 0.3 s and 0.02 s idle.
# Run from the repository root: bash docs/figures/overhead-zen4/2026-12-07b/keep-warm-ab.sh
F=docs/figures/overhead-zen4/2026-12-07b
patch -s -o /tmp/hop-floor-keep-warm.py scripts/hop-floor.py $F/hop-floor-keep-warm.diff
for round in 1 2; do
  echo "== A (as is), round $round"; .venv/bin/python /tmp/hop-floor-keep-warm.py --samples 40 --gap 0.3 | tail -5
  echo "== B (kept warm every 10 ms), round $round"
  WARM_MS=10 REDIS_PING=1 GRPC_PING=1 .venv/bin/python /tmp/hop-floor-keep-warm.py --samples 40 --gap 0.3 | tail -5
done
echo "== raw asyncio TCP, one byte each way (ms, P50 of 40)"; .venv/bin/python $F/raw-tcp-pingpong.py
