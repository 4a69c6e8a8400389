"""The engine's decode step with this tree's kernels against another revision's, alternated in one
process, so that the VM's drift between runs (10-20%, more between its slow and fast hours) falls
on both alike.

    .venv/bin/python scripts/decode-step-ab.py --baseline b1658ca --shapes 32x256,64x256,32x1024 --rounds 4
    .venv/bin/python scripts/decode-step-ab.py --baseline b1658ca --threads 1 --shapes 16x192,32x128

Builds splitserve/engine/kernels/cpu_bf16.cpp as it was at the baseline revision (git show) beside
this tree's, loads one engine (the default model), and times `bench engine`'s decode step
(`bench_decode`: the best of --steps steps) at each batch x context with either module as the
engine's kernels, in turn, on cores 0-1 with two threads (or core 0 with one: --threads 1). Each
round starts with a memory-read probe (GB/s), to tell the VM's hour. The step computes over the
cache as it is, so two revisions that lay the cache out differently are timed alike; both must pack
weights the same way (checked). docs/benchmarks.md, "KV blocks in a tiled layout".
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the git revision whose kernels to compare against")
    p.add_argument("--shapes", default="32x256,64x256,32x1024,64x1024,8x1024",
                   help="batch x context, comma-separated (default: 32x256,64x256,32x1024,64x1024,8x1024)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of every shape (default: 4)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape, the best kept (default: 8)")
    p.add_argument("--threads", type=int, choices=(1, 2), default=2,
                   help="torch threads, pinned to cores 0-1 or (one) to core 0 (default: 2)")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    os.sched_setaffinity(0, [0, 1] if args.threads == 2 else [0])
    import torch
    from kernels_at import load_kernels_at

    from splitserve.bench.engine_bench import bench_decode
    from splitserve.engine import EngineConfig, LLMEngine
    from splitserve.engine.kernels import load_cpu_kernels

    torch.set_num_threads(args.threads)
    new = load_cpu_kernels()
    if new is None:
        sys.exit("the compiled kernels do not run on this CPU")
    old = load_kernels_at(args.baseline, "decode_step_baseline")
    if new.amx_enabled() and not old.amx_enable():
        sys.exit("this tree's kernels run on AMX and the baseline's could not")
    weight = torch.randn(200, 576, dtype=torch.bfloat16)
    if not torch.equal(old.pack_weight(weight), new.pack_weight(weight)):
        sys.exit("the two revisions pack weights differently: one engine cannot run both")

    engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
    ops = engine.runner.model.ops
    times: dict[tuple[int, int], dict[str, list[float]]] = {shape: {"baseline": [], "this tree": []}
                                                           for shape in shapes}
    probe = torch.ones(256 << 20)
    for r in range(args.rounds):
        probe.sum()
        start = time.perf_counter()
        probe.sum()
        print(f"round {r + 1}: memory read {(1 << 30) / (time.perf_counter() - start) / 1e9:.0f} GB/s", flush=True)
        order = [("baseline", old), ("this tree", new)]
        for shape in shapes:
            for name, module in order if r % 2 == 0 else order[::-1]:
                ops.k = module
                times[shape][name].append(round(bench_decode(engine, *shape, args.steps) * 1e3, 2))
        ops.k = new
    for (batch, context), runs in times.items():
        print(f"{batch} x {context}: step ms, baseline {runs['baseline']}, this tree {runs['this tree']}")


if __name__ == "__main__":
    main()
