"""`splitserve bench latency`: the engine's own time for one request, the floor the cluster adds to.

One request at a time, in process, with the same kind of prompt `bench serve` sends (random token
ids of an exact length, output forced): the prefill step's time (what TTFT would be with no queue
and no hops) and every decode step's time (what TPOT would be). The cluster's overhead budget is
measured against these, with the engine placed like a cluster worker (--cpus, --threads).

With --batch, B requests are prefilled and decoded together for each B given, and the decode steps
that ran all B are timed: the engine-alone figure for each batch class of a worker's
`splitserve:engine_step_seconds`.
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
        steps = _timed_steps(engine)
        if i >= args.warmup:
            prefill_ms.append(steps[0][2])
            decode_ms += [ms for _, _, ms in steps[1:]]
    report = {
        "model": engine.loaded.source.name, "input_len": args.input_len, "output_len": args.output_len,
        "requests": args.repeat, "threads": _threads(), "cpus": args.cpus,
        "prefill_ms": _stats(prefill_ms), "decode_step_ms": _stats(decode_ms),
    }
    batches = sorted(set(args.batch) - {1})
    if batches:
        report["decode_step_ms_by_batch"] = {"1": report["decode_step_ms"], **{
            str(b): _stats(_batch_decode_ms(engine, rng, params, b, args)) for b in batches}}
    print(json.dumps(report, indent=2))
    return 0


def _timed_steps(engine: LLMEngine) -> list[tuple[str, int, float]]:
    """Step the engine until it is idle: (kind, sequences, milliseconds) of each step that ran."""
    steps = []
    while engine.has_work:
        start = time.perf_counter()
        engine.step()
        ms = (time.perf_counter() - start) * 1000
        if engine.last_step is not None:
            steps.append((engine.last_step.kind, engine.last_step.num_seqs, ms))
    return steps


def _batch_decode_ms(engine: LLMEngine, rng: random.Random, params: SamplingParams, batch: int,
                     args: argparse.Namespace) -> list[float]:
    """The decode steps that ran all of batch requests together, over warmup + repeat rounds."""
    if batch > engine.config.max_num_seqs:
        raise ValueError(f"--batch {batch} is over --max-num-seqs {engine.config.max_num_seqs}")
    timed = []
    for i in range(args.warmup + args.repeat):
        for j in range(batch):
            prompt = [rng.randrange(1000, 30000) for _ in range(args.input_len)]
            engine.add_request(f"latency-b{batch}-{i}-{j}", prompt, params)
        if i >= args.warmup:  # all outputs are forced to one length: every decode step runs them all
            timed += [ms for kind, seqs, ms in _timed_steps(engine) if kind == "decode" and seqs == batch]
        else:
            _timed_steps(engine)
    return timed


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(percentile(ordered, 50), 2), "mean": round(statistics.fmean(ordered), 2),
            "p90": round(percentile(ordered, 90), 2), "count": len(ordered)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()
