"""Decode step time on the block tables a long-running server ends up with, by allocator.

    .venv/bin/python scripts/block-scatter.py --kv-cache-gb 2 --rounds 3

`bench engine` times decode steps on a fresh block manager, whose tables are runs of consecutive
blocks. A server's tables after churn are not: sequences arrive, grow one block every 16 tokens all
at once, and finish. This script plays such a server's steady state (batch sequences, each a prompt
of 3/4 of the context and an output of 1/2, staggered so their lengths spread around the context)
on three allocators, then times the same engine's decode step on each one's tables, in turns, on
cores 0-1 with two torch threads:

- fresh: every sequence's blocks in one run (what `bench engine` measures);
- fifo: the allocator before runs were kept (free blocks reused in the order they were freed);
- runs: the engine's BlockManager (a table continues its run while the next block is free).

It prints the mean blocks per run of each layout, what each allocator's churn cost per sequence
per step (pure Python, no engine), and each round's step times in ms
(docs/benchmarks.md, "Scattered blocks").
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import deque
from itertools import pairwise

SHAPES = ((32, 1024), (64, 1024), (8, 1024), (32, 256))  # (batch, context)


class FifoBlocks:
    """The allocator before runs were kept: one deque of free blocks, reused first freed first."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self._free = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self.block_size = block_size

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        self._tables[request_id] = []
        return self.grow(request_id, num_tokens)

    def grow(self, request_id: str, num_tokens: int) -> list[int]:
        table = self._tables[request_id]
        new = [self._free.popleft() for _ in range(-(-num_tokens // self.block_size) - len(table))]
        table.extend(new)
        return new

    def free(self, request_id: str) -> None:
        self._free.extend(self._tables.pop(request_id))

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]


def churned_tables(blocks, batch: int, context: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Tables and lengths of the batch sequences live after a steady state of arrivals and finishes:
    each arrives with a prompt of 3/4 of the context, decodes 1/2 of it, and is replaced on finish."""
    prompt, output = context * 3 // 4, context // 2
    rng = random.Random(seed)
    live: dict[str, list[int]] = {}  # request -> [tokens, tokens still to decode]
    for i in range(batch):  # staggered: each has a random part of its output still to decode
        live[f"s{i}"] = [prompt + 1, output - rng.randrange(output)]
        blocks.allocate(f"s{i}", prompt + 1)
    arrived = batch
    for _ in range(3 * output):
        for rid in list(live):
            state = live[rid]
            state[0] += 1
            state[1] -= 1
            if state[1] > 0:
                blocks.grow(rid, state[0])
                continue
            blocks.free(rid)
            del live[rid]
            new = f"s{arrived}"
            arrived += 1
            live[new] = [prompt + 1, output]
            blocks.allocate(new, prompt + 1)
    return [list(blocks.block_table(r)) for r in live], [tokens for tokens, _ in live.values()]


def mean_run(tables: list[list[int]]) -> float:
    runs = sum(1 + sum(b != a + 1 for a, b in pairwise(t)) for t in tables)
    return sum(len(t) for t in tables) / runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="the KV cache (default: 2, 64 x 1,280 fits)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three layouts (default: 3)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape, the best kept (default: 8)")
    args = p.parse_args()
    os.sched_setaffinity(0, [0, 1])
    import torch

    torch.set_num_threads(2)
    from splitserve.bench.engine_bench import best_time
    from splitserve.engine import EngineConfig, LLMEngine, SamplingParams, Sequence
    from splitserve.engine.block_manager import BlockManager

    engine = LLMEngine(EngineConfig(kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), max_num_seqs=128))
    num_blocks, block_size = engine.blocks.num_blocks, engine.blocks.block_size
    with open("/proc/self/smaps_rollup") as f:
        print(next(line.strip() for line in f if line.startswith("AnonHugePages")), f"({num_blocks} blocks)")
    layouts = {}
    for batch, context in SHAPES:
        steps = 3 * (context // 2) * batch  # sequence-steps of churned_tables' churn
        start = time.perf_counter()
        runs_tables, lengths = churned_tables(BlockManager(num_blocks, block_size), batch, context, seed=batch)
        runs_us = (time.perf_counter() - start) / steps * 1e6
        start = time.perf_counter()
        fifo_tables, fifo_lengths = churned_tables(FifoBlocks(num_blocks, block_size), batch, context, seed=batch)
        fifo_us = (time.perf_counter() - start) / steps * 1e6
        assert fifo_lengths == lengths
        fresh = BlockManager(num_blocks, block_size)
        fresh_tables = [fresh.allocate(f"f{i}", n) for i, n in enumerate(lengths)]
        layouts[batch, context] = lengths, {"fresh": fresh_tables, "fifo": fifo_tables, "runs": runs_tables}
        print(f"{batch} x {context} (lengths {min(lengths)}-{max(lengths)}): mean blocks per run",
              {name: round(mean_run(t), 1) for name, t in layouts[batch, context][1].items()},
              f"; churn, us per sequence per step: fifo {fifo_us:.2f}, runs {runs_us:.2f}")
    runner = engine.runner
    for r in range(args.rounds):
        for name in ("fresh", "fifo", "runs"):
            ms = []
            for (batch, context), (lengths, tables) in layouts.items():
                seqs = [Sequence(f"b{i}", [5] * (n - 1), SamplingParams(temperature=0.0))
                        for i, n in enumerate(lengths)]
                for s in seqs:
                    s.output_token_ids.append(5)
                    s.num_computed_tokens = s.num_tokens - 1
                table = tables[name]
                step = best_time(lambda s=seqs, t=table: runner.greedy(runner.decode(s, t)).tolist(),
                                 runner.device, args.steps)
                ms.append(round(step * 1e3, 1))
            print(f"round {r + 1}, {name}: {ms} ms")


if __name__ == "__main__":
    main()
