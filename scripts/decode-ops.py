"""Where a decode step's time goes, by operation, at `bench engine`'s shapes.

    .venv/bin/python scripts/decode-ops.py --shapes 32x256,64x256,32x1024 --rounds 2

Wraps the engine's compiled operations (GEMMs, decode attention, RoPE + KV write, add + RMSNorm,
SiLU * up) with a wall clock each (they run synchronously on the CPU), runs `bench engine`'s decode
step (`bench_decode`) on cores 0-1 with two torch threads, and prints per shape the best step and
each operation's mean time per step; what the operations leave is the step's Python, sampling and
small torch ops (docs/benchmarks.md, "The GEMM's next tile").
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

OPS = ("linear", "decode_attention", "rope_write_kv", "add_rmsnorm", "silu_mul")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="32x256,64x256,32x1024", help="batch x context, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every shape (default: 2)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape (default: 8)")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    os.sched_setaffinity(0, [0, 1])
    import torch

    torch.set_num_threads(2)
    from splitserve.bench.engine_bench import bench_decode
    from splitserve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=2 << 30, max_num_seqs=128))
    ops = engine.runner.model.ops
    spent: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    for name in OPS:
        setattr(ops, name, timed(name, getattr(ops, name)))
    for r in range(args.rounds):
        for batch, context in shapes:
            spent.clear()
            best = bench_decode(engine, batch, context, args.steps)
            calls = args.steps + 1  # bench_decode's warm-up step runs the operations too
            per_step = {name: round(spent[name] / calls * 1e3, 2) for name in OPS}
            print(f"round {r + 1}, {batch} x {context}: best step {best * 1e3:.1f} ms; mean ms per step:",
                  per_step, flush=True)


if __name__ == "__main__":
    main()
