"""What fsync on every write costs an accepted request: the latency of the gateway's XADD of a request
(a 1 KB entry, about a 250-token prompt) to a private redis-server with its append-only file fsynced on
every write (appendfsync always: what splitserve runs) and once a second (everysec: Redis's default,
which may lose the last second of accepted requests). Rounds alternate between the two in one run.

    .venv/bin/python scripts/redis-fsync-cost.py [--writes 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import redis

from splitserve.queue.redis_server import LocalRedis


def measure(client: redis.Redis, writes: int) -> list[float]:
    payload = b"x" * 1024
    times = []
    for _ in range(writes):
        started = time.perf_counter()
        client.xadd("fsync-test", {b"msg": payload})
        times.append((time.perf_counter() - started) * 1000)
    client.delete("fsync-test")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with LocalRedis(appendonly=True) as server:
        client = redis.Redis(port=server.port)
        for round_ in range(1, args.rounds + 1):
            for policy in ("always", "everysec"):
                client.config_set("appendfsync", policy)
                times = sorted(measure(client, args.writes))
                p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
                print(f"round {round_}  appendfsync {policy:<8}  XADD p50 {p50:.3f} ms  p99 {p99:.3f} ms  "
                      f"mean {statistics.fmean(times):.3f} ms  ({args.writes} writes)", flush=True)


if __name__ == "__main__":
    main()
