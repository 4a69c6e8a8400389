"""A model's GEMMs at a decode step's row counts: this tree's kernels against another revision's.

    .venv/bin/python scripts/gemm-rows.py --baseline dc689dc --rows 1,8,16,32,64,128 --rounds 2

Builds splitserve/engine/kernels/cpu_bf16.cpp as it was at the baseline revision (git show) beside
this tree's, checks both give the same bits, and times, alternated in one process on cores 0-1 with
two threads (or on core 1 with one: --threads 1), one decode step's GEMMs of SmolLM2-135M's shapes (30 layers' QKV, O, gate-up and down
projections, each layer its own random weights so they stream from memory as in a step, and the LM
head): the best of five, in ms and GFLOP/s. Both run the AVX512 path, AMX or not (docs/benchmarks.md, "The GEMM's next tile").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K) of a layer's four projections
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the git revision whose kernels to compare against")
    p.add_argument("--rows", default="1,8,16,32,64,128", help="row counts (default: 1,8,16,32,64,128)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every row count (default: 2)")
    p.add_argument("--threads", type=int, choices=(1, 2), default=2,
                   help="torch threads, pinned to cores 0-1 or (one) to core 1, as a one-core worker (default: 2)")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    os.sched_setaffinity(0, [0, 1] if args.threads == 2 else [1])
    import torch
    from kernels_at import load_kernels_at

    from splitserve.engine.kernels import load_cpu_kernels

    torch.set_num_threads(args.threads)
    new = load_cpu_kernels()
    if new is None:
        sys.exit("the compiled kernels do not run on this CPU")
    new.set_amx(False)  # the baseline build never asks for AMX: both time the AVX512 path
    old = load_kernels_at(args.baseline, "gemm_rows_baseline")

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16)

    layers = [[new.pack_weight(rand(n, k)) for n, k in SHAPES] for _ in range(LAYERS)]
    head = new.pack_weight(rand(VOCAB, HIDDEN))
    for m in rows:
        for (n, k), w in zip(SHAPES, layers[0]):
            x = rand(m, k)
            if not torch.equal(old.gemm(x, w, n, None), new.gemm(x, w, n, None)):
                sys.exit(f"the two builds differ at {m} x {k} @ {k} x {n}")
    print("same bits at every row count")
    flops_per_row = 2 * (LAYERS * sum(n * k for n, k in SHAPES) + VOCAB * HIDDEN)

    def step(module, m: int) -> str:
        xs = {k: rand(m, k) for k in {k for _, k in SHAPES}}
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for layer in layers:
                for (n, k), w in zip(SHAPES, layer):
                    module.gemm(xs[k], w, n, None)
            module.gemm(xs[HIDDEN], head, VOCAB, None)
            best = min(best, time.perf_counter() - start)
        return f"{best * 1e3:.2f} ms, {m * flops_per_row / best / 1e9:.0f} GFLOP/s"

    for r in range(args.rounds):
        for m in rows:
            print(f"round {r + 1}, {m} rows: baseline {step(old, m)} | this tree {step(new, m)}", flush=True)


if __name__ == "__main__":
    main()
