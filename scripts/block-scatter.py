"""Decode step time with each sequence's KV blocks in runs (a fresh server) against scattered (after churn).

    .venv/bin/python scripts/block-scatter.py --kv-cache-gb 1.6 --rounds 2

`bench engine` times decode steps on a fresh block manager, whose tables are runs of consecutive
blocks. The same engine here takes its blocks from the free list in order, then shuffled, in turns,
on cores 0-1 with two torch threads, and prints each round's step times (ms) and how much of the
process is on 2 MiB pages (docs/benchmarks.md, "Scattered blocks").
"""

from __future__ import annotations

import argparse
import os
import random
from collections import deque

SHAPES = ((32, 1024), (64, 1024), (8, 1024))  # (batch, context)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-cache-gb", type=float, default=1.6, help="the KV cache (default: 1.6, 64 x 1,024 fits)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of in order, then shuffled (default: 2)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape, the best kept (default: 8)")
    args = p.parse_args()
    os.sched_setaffinity(0, [0, 1])
    import torch

    torch.set_num_threads(2)
    from splitserve.bench.engine_bench import bench_decode
    from splitserve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), max_num_seqs=128))
    with open("/proc/self/smaps_rollup") as f:
        print(next(line.strip() for line in f if line.startswith("AnonHugePages")))
    print("shapes (batch x context):", ", ".join(f"{b} x {c}" for b, c in SHAPES))
    for r in range(args.rounds):
        for shuffled in (False, True):
            free = sorted(engine.blocks._free)
            if shuffled:
                random.Random(r).shuffle(free)
            engine.blocks._free = deque(free)
            ms = [round(bench_decode(engine, b, c, args.steps) * 1e3, 1) for b, c in SHAPES]
            print(f"round {r + 1}, {'shuffled' if shuffled else 'in order'}: {ms} ms")


if __name__ == "__main__":
    main()
