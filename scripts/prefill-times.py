"""A prompt's prefill time in the engine alone, whole and in chunks: the median of --repeat prompts
(after one untimed) for each `LENGTH` or `LENGTH/CHUNK` shape, e.g. on both cores with two threads

    .venv/bin/python scripts/prefill-times.py --cpus 0,1 --threads 2 --shapes 128 256 1024 1024/256 1024/128

What docs/benchmarks.md's chunk costs and the GEMM row-group fix were measured with (each prompt
is random token ids and yields one token; the prefix cache is off so nothing is reused).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from splitserve.common.engine_args import add_engine_args, apply_threads, engine_config_from_args
from splitserve.engine import LLMEngine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["256", "1024", "1024/256"],
                        help="LENGTH (whole) or LENGTH/CHUNK (chunked prefill) (default: 256 1024 1024/256)")
    parser.add_argument("--repeat", type=int, default=3, help="timed prompts per shape (default: 3)")
    add_engine_args(parser)
    args = parser.parse_args()
    args.prefix_caching = False
    apply_threads(args)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    result = {}
    for shape in args.shapes:
        length, _, chunk = shape.partition("/")
        args.chunk_size = int(chunk) if chunk else None
        engine = LLMEngine(engine_config_from_args(args))
        times = []
        for i in range(args.repeat + 1):
            engine.add_request(f"p{i}", [rng.randrange(1000, 30000) for _ in range(int(length))], params)
            started = time.perf_counter()
            while engine.has_work:
                engine.step()
            times.append((time.perf_counter() - started) * 1000)
        result[shape] = round(statistics.median(times[1:]), 1)
    print(json.dumps({"prefill_ms": result}))


if __name__ == "__main__":
    main()
