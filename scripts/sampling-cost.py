"""What logprobs and structured output cost the engine per token, on this machine.

Runs the same batch (default 32 sequences of 128 prompt tokens, 64 output tokens, greedy, bfloat16,
one thread per worker as in the cluster) with nothing asked, with logprobs and top_logprobs 20, with
prompt_logprobs 20, and with a grammar (a regex of 400 lowercase letters or spaces, which no sequence
completes within 64 tokens), alternating, and prints each run's prefill and mean decode-step times.

    .venv/bin/python scripts/sampling-cost.py [--batch 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitserve.engine import EngineConfig, LLMEngine, LoadedModel, SamplingParams
from splitserve.engine.structured import Grammar


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
    """(the prefill step's seconds, the mean decode step's seconds)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", prompt, params)
    started = time.perf_counter()
    engine.step()  # the whole batch's prefill (within the token budget)
    prefill = time.perf_counter() - started
    steps = []
    while engine.has_work:
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
    return prefill, statistics.mean(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = EngineConfig(kv_cache_bytes=1 << 30, token_budget=args.batch * args.prompt_len,
                          enable_prefix_caching=False)
    engine = LLMEngine(config, loaded=LoadedModel.load(config))
    prompts = [[(7 * i + 13 * j) % 30000 + 100 for j in range(args.prompt_len)] for i in range(args.batch)]
    base = dict(temperature=0.0, max_new_tokens=args.output_len, ignore_eos=True)
    configs = {"none": SamplingParams(**base), "logprobs top 20": SamplingParams(**base, logprobs=True, top_logprobs=20),
               "prompt_logprobs 20": SamplingParams(**base, prompt_logprobs=20),
               "grammar": SamplingParams(**base, grammar=Grammar(regex="[a-z ]{400}"))}
    run(engine, prompts, configs["none"])  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for _ in range(args.repeat):
        for name, params in configs.items():
            results[name].append(run(engine, prompts, params))
    print(f"batch {args.batch} x {args.prompt_len} prompt tokens, {args.output_len} output tokens, "
          f"{args.threads} thread(s), vocabulary {engine.loaded.spec.vocab_size}")
    for name, runs in results.items():
        prefill = ", ".join(f"{p * 1e3:.0f}" for p, _ in runs)
        decode = ", ".join(f"{d * 1e3:.1f}" for _, d in runs)
        print(f"{name:>20}: prefill {prefill} ms; decode step {decode} ms")


if __name__ == "__main__":
    main()
