"""Where a decode step's time goes: --batch requests of --prompt-len random tokens decode together
(greedy, output forced with min_tokens as `bench serve` forces it), and once every one is decoding,
--steps steps run under cProfile (Python functions and the kernels they call, by own time), then
under torch.profiler (torch's operators). On one core:

    .venv/bin/python scripts/step-profile.py --cpus 0 --threads 1 --batch 48 --prompt-len 64

What docs/benchmarks.md's "Greedy rows below min_tokens" profile was taken with.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time

from splitserve.common.engine_args import add_engine_args, apply_threads, engine_config_from_args
from splitserve.engine import LLMEngine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=48, help="requests decoding together (default: 48)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens each (default: 64)")
    parser.add_argument("--steps", type=int, default=20, help="profiled decode steps (default: 20)")
    parser.add_argument("--top", type=int, default=20, help="rows of each table (default: 20)")
    add_engine_args(parser)
    args = parser.parse_args()
    apply_threads(args)
    engine = LLMEngine(engine_config_from_args(args))
    if not 1 <= args.batch <= engine.config.max_num_seqs:
        parser.error(f"--batch must be 1 to --max-num-seqs ({engine.config.max_num_seqs})")
    rng = random.Random(0)
    new_tokens = 4 * args.steps + 64
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            ignore_eos=True)
    for i in range(args.batch):
        prompt = [rng.randrange(1000, 30000) for _ in range(args.prompt_len)]
        engine.add_request(f"profile-{i}", prompt, params)
    while True:  # until every request decodes in one step
        if not engine.has_work:
            raise SystemExit(f"no step decoded all {args.batch} requests together (too few KV blocks?)")
        engine.step()
        last = engine.last_step
        if last is not None and last.kind == "decode" and last.num_seqs == args.batch:
            break
    timed = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        timed.append((time.perf_counter() - start) * 1e3)
    print(f"decode step at batch {args.batch}: {statistics.median(timed):.2f} ms (median of {args.steps})")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
