"""`splitserve bench latency`: the engine's own time for one request, the floor the cluster adds to.

One request at a time, in process, with the same kind of prompt `bench serve` sends (random token
ids of an exact length, output forced): the prefill step's time (what TTFT would be with no queue
and no hops) and every decode step's time (what TPOT would be). The cluster's overhead budget is
measured against these, with the engine placed like a cluster worker (--cpus, --threads).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from splitserve.bench.loadgen.metrics import percentile
from splitserve.common.engine_args import apply_threads, engine_config_from_args
from splitserve.engine import LLMEngine, SamplingParams


def run(args: argparse.Namespace) -> int:
    if args.chunk_size:
        raise ValueError("bench latency times whole-prompt prefill; --chunk-size does not apply")
    if args.output_len < 2:
        raise ValueError("--output-len must be >= 2: one token is the prefill's, the rest are decode steps")
    apply_threads(args)
    engine = LLMEngine(engine_config_from_args(args))
    rng = random.Random(args.seed)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                            ignore_eos=True)
    prefill_ms, decode_ms = [], []
    for i in range(args.warmup + args.repeat):
        prompt = [rng.randrange(1000, 30000) for _ in range(args.input_len)]
        engine.add_request(f"latency-{i}", prompt, params)
        steps = []
        while engine.has_work:
            start = time.perf_counter()
            engine.step()
            steps.append((time.perf_counter() - start) * 1000)
        if i >= args.warmup:
            prefill_ms.append(steps[0])
            decode_ms += steps[1:]
    report = {
        "model": engine.loaded.source.name, "input_len": args.input_len, "output_len": args.output_len,
        "requests": args.repeat, "threads": _threads(), "cpus": args.cpus,
        "prefill_ms": _stats(prefill_ms), "decode_step_ms": _stats(decode_ms),
    }
    print(json.dumps(report, indent=2))
    return 0


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(percentile(ordered, 50), 2), "mean": round(statistics.fmean(ordered), 2),
            "p90": round(percentile(ordered, 90), 2), "count": len(ordered)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()
