"""A one-thread decode step on core 0 with core 1 idle, and with a second engine stepping on core 1
at the same time, alternated in one run: what a one-core worker's step costs when the worker on the
other core is busy too, with nothing of the serving path in either process.

    .venv/bin/python scripts/neighbour-step.py --shapes 1x128,16x128,40x128,64x128 --rounds 4

Two processes, each with the default model and one torch thread: this one pinned to core 0, a
neighbour pinned to core 1. Each round times --steps decode steps at each batch x context
(`bench engine`'s step: the runner's decode and the greedy argmax, each step rewriting the last
slot) with the neighbour idle and then with it stepping the same shape in a loop (the order
reversed every other round), and opens with a memory-read probe (GB/s) to tell the VM's hour.
Prints each shape's median step in ms per round and setup, and their ratio per round
(docs/benchmarks.md, "On AMD's Zen 4": two one-core engines side by side).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

from decode_ab import parse_shapes, read_rate_gbps


def load_engine():
    import torch

    torch.set_num_threads(1)
    from splitserve.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(kv_cache_bytes=2 << 30, max_num_seqs=128))


class Stepper:
    """Decode steps at one fixed batch x context (the sequences and block tables made once)."""

    def __init__(self, engine, batch: int, context: int) -> None:
        from splitserve.bench.engine_bench import decode_batch

        self.engine = engine
        self.seqs, self.tables = decode_batch(engine, batch, context)

    def step(self) -> float:
        runner = self.engine.runner
        start = time.perf_counter()
        runner.greedy(runner.decode(self.seqs, self.tables)).tolist()
        return time.perf_counter() - start

    def close(self) -> None:
        for s in self.seqs:
            self.engine.blocks.free(s.request_id)


def neighbour(shape, go, stepping, ready) -> None:
    """On core 1: while `go` is set, step the shape in `shape` in a loop (`stepping` set once the
    first step of it is done); otherwise wait."""
    os.sched_setaffinity(0, [1])
    engine = load_engine()
    ready.set()
    while True:
        go.wait()
        batch, context = shape[0], shape[1]
        if batch == 0:
            return
        stepper = Stepper(engine, batch, context)
        stepper.step()
        stepping.set()
        while go.is_set():
            stepper.step()
        stepper.close()
        stepping.clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x128,16x128,40x128,64x128",
                   help="batch x context, comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of every shape (default: 4)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per shape and setup (default: 20)")
    args = p.parse_args()
    shapes = parse_shapes(args.shapes)

    ctx = mp.get_context("spawn")
    shape, go, stepping, ready = ctx.Array("i", 2), ctx.Event(), ctx.Event(), ctx.Event()
    other = ctx.Process(target=neighbour, args=(shape, go, stepping, ready), daemon=True)
    other.start()
    os.sched_setaffinity(0, [0])
    engine = load_engine()
    ready.wait()
    import torch

    names = ("core 1 idle", "core 1 stepping")
    times = {s: {n: [] for n in names} for s in shapes}
    probe = torch.ones(256 << 20)
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}: memory read {read_rate_gbps(probe):.0f} GB/s", flush=True)
            for batch, context in shapes:
                stepper = Stepper(engine, batch, context)
                for name in names if r % 2 == 0 else names[::-1]:
                    if name == "core 1 stepping":
                        shape[0], shape[1] = batch, context
                        go.set()
                        stepping.wait()
                    stepper.step()  # warm
                    steps = [stepper.step() * 1e3 for _ in range(args.steps)]
                    times[(batch, context)][name].append(statistics.median(steps))
                    if go.is_set():
                        go.clear()
                        while stepping.is_set():
                            time.sleep(0.005)
                stepper.close()
    finally:
        shape[0] = 0
        go.set()
        other.join(timeout=30)
    for (batch, context), runs in times.items():
        ratios = [f"{b / a:.2f}" for a, b in zip(runs[names[0]], runs[names[1]])]
        print(f"{batch} x {context}: median step ms per round, " + ", ".join(
            f"{n} {[round(t, 2) for t in runs[n]]}" for n in names) + f"; stepping / idle {ratios}")


if __name__ == "__main__":
    main()
