"""The engine's decode step over sequences of unequal contexts, with this tree's kernels against
another revision's, alternated in one process (docs/benchmarks.md, "Threads that finish first help
the others").

    .venv/bin/python scripts/uneven-contexts-ab.py --baseline 6f53c55 --rounds 3

A server's running batch is in arrival order, oldest first, so its first sequences have the longest
contexts. Each case times the median of --steps decode steps (after 3 warm-up steps) with either
module as the engine's kernels, twice each in turn, on cores 0-1 with two threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

CASES = {
    "32 x 1,024 (even)": [1024] * 32,
    "32 from 1,984 down to 124": [1984 - 60 * i for i in range(32)],
    "32 from 192 down to 68 (W3's)": [192 - 4 * i for i in range(32)],
    "8 from 1,984 down to 304": [1984 - 240 * i for i in range(8)],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the git revision whose kernels to compare against")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every case (default: 3)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per case and module (default: 30)")
    args = p.parse_args()
    os.sched_setaffinity(0, [0, 1])
    import torch
    from kernels_at import load_kernels_at

    from splitserve.bench.engine_bench import _random_seqs
    from splitserve.engine import EngineConfig, LLMEngine
    from splitserve.engine.kernels import load_cpu_kernels

    torch.set_num_threads(2)
    new = load_cpu_kernels()
    if new is None:
        sys.exit("the compiled kernels do not run on this CPU")
    old = load_kernels_at(args.baseline, "uneven_contexts_baseline")
    engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
    ops, runner = engine.runner.model.ops, engine.runner

    def medians(lengths: list[int]) -> dict[str, list[float]]:
        seqs = []
        for i, length in enumerate(lengths):
            s = _random_seqs(engine, 1, length - 1)[0]
            s.request_id = f"uneven-{i}"
            s.output_token_ids.append(5)
            s.num_computed_tokens = length - 1
            seqs.append(s)
        tables = [engine.blocks.allocate(s.request_id, length) for s, length in zip(seqs, lengths)]
        times: dict[str, list[float]] = {"baseline": [], "this tree": []}
        try:
            for name, module in [("baseline", old), ("this tree", new)] * 2:
                ops.use_kernels(module)
                for _ in range(3):
                    runner.greedy(runner.decode(seqs, tables)).tolist()
                steps = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    runner.greedy(runner.decode(seqs, tables)).tolist()
                    steps.append(time.perf_counter() - start)
                times[name].append(round(statistics.median(steps) * 1e3, 2))
        finally:
            ops.use_kernels(new)
            for s in seqs:
                engine.blocks.free(s.request_id)
        return times

    for r in range(args.rounds):
        for name, lengths in CASES.items():
            times = medians(lengths)
            print(f"round {r + 1}, {name}: median step ms, baseline {times['baseline']}, "
                  f"this tree {times['this tree']}", flush=True)


if __name__ == "__main__":
    main()
