"""Decode step time with the engine built on a thread that stays alive or on one that exits.

    .venv/bin/python scripts/openmp-teams.py main|pool|oneoff

torch's OpenMP runtime (libgomp) keeps a team of worker threads for each thread that ran a parallel
region, while that thread lives. Building the engine (weight packing runs parallel regions) on a
thread that stays, then stepping it on another, leaves two teams on two cores
(docs/benchmarks.md, "In-worker step time"). The engine is stepped on a thread of its own, as in a
worker, on cores 0-1 with two torch threads; prints the decode step P50 at batch 1, 4 and 8.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import statistics
import sys
import threading
import time

os.sched_setaffinity(0, [0, 1])
import torch  # noqa: E402

torch.set_num_threads(2)
from splitserve.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


EXECUTOR = concurrent.futures.ThreadPoolExecutor(1)  # like asyncio's default executor: it lives on


def build(where: str) -> LLMEngine:
    if where == "main":
        return LLMEngine(EngineConfig())
    if where == "pool":  # asyncio.to_thread's executor: its thread stays
        return EXECUTOR.submit(LLMEngine, EngineConfig()).result()
    built: list[LLMEngine] = []
    thread = threading.Thread(target=lambda: built.append(LLMEngine(EngineConfig())))
    thread.start()
    thread.join()
    return built[0]


def decode_p50(engine: LLMEngine, batch: int, rng: random.Random) -> float:
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    for j in range(batch):
        engine.add_request(f"b{batch}-{j}", [rng.randrange(100, 40000) for _ in range(256)], params)
    times = []
    while engine.has_work:
        start = time.perf_counter()
        engine.step()
        if engine.last_step and engine.last_step.kind == "decode" and engine.last_step.num_seqs == batch:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    where = sys.argv[1] if len(sys.argv) > 1 else "oneoff"
    engine, rng, results = build(where), random.Random(1), []
    stepper = threading.Thread(target=lambda: results.extend(decode_p50(engine, b, rng) for b in (1, 4, 8)))
    stepper.start()
    stepper.join()
    figures = ", ".join(f"batch {b} {ms:.1f} ms" for b, ms in zip((1, 4, 8), results))
    print(f"{where}: decode step P50 {figures}")


if __name__ == "__main__":
    main()
