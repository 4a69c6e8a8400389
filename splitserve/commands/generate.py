"""`splitserve generate`: one prompt through the cluster's gateway (gRPC), or an in-process engine."""

from __future__ import annotations

import argparse
import os
import sys
import time

from splitserve.common.detokenize import IncrementalDetokenizer
from splitserve.common.engine_args import add_engine_args, apply_threads, engine_config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text for one prompt (gRPC client of the gateway)",
                              description="Generate text for one prompt through a running cluster's gateway "
                                          "(gRPC), or with --local in this process (no cluster needed). "
                                          "Text goes to stdout, timings to stderr.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--gateway", default=os.environ.get("SPLITSERVE_GATEWAY", "127.0.0.1:50051"),
                   help="gateway gRPC host:port (default: 127.0.0.1:50051)")
    p.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"),
                   help="the gateway's API key, if it requires one")
    p.add_argument("--local", action="store_true", help="run an engine in this process instead")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is instead of through the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    add_engine_args(p)  # with --local
    p.set_defaults(func=run)


def prompt_token_ids(tokenizer, prompt: str, raw: bool) -> list[int]:
    if raw or not tokenizer.chat_template:
        return tokenizer(prompt)["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run(args: argparse.Namespace) -> int:
    if not args.local:
        from splitserve.commands.generate_remote import run_remote

        return run_remote(args)
    from splitserve.engine import LLMEngine, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_new_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    apply_threads(args)
    engine = LLMEngine(engine_config_from_args(args))
    prompt = prompt_token_ids(engine.tokenizer, args.prompt, args.raw)
    detok = IncrementalDetokenizer(engine.tokenizer, prompt_token_ids=prompt)
    start = time.perf_counter()
    seq = engine.add_request("generate-0", prompt, params)
    token_times = []
    while engine.has_work:
        for out in engine.step():
            if out.error is not None:
                raise SystemExit(f"\n{out.error}")
            token_times.append(time.perf_counter())
            sys.stdout.write(detok.add(out.token_id))
            sys.stdout.flush()
    sys.stdout.write("\n")
    print_summary(len(prompt), len(token_times), seq.finish_reason.value, start, token_times)
    return 0


def print_summary(num_prompt_tokens: int, num_generated: int, finish_reason: str, start: float,
                  token_times: list[float]) -> None:
    """One line on stderr: counts, finish reason, TTFT and TPOT (token_times: perf_counter stamps)."""
    ttft = token_times[0] - start
    tpot = (token_times[-1] - token_times[0]) / max(1, len(token_times) - 1)
    print(f"[{num_prompt_tokens} prompt tokens, {num_generated} generated, finish_reason="
          f"{finish_reason}, ttft {ttft * 1e3:.1f} ms, tpot {tpot * 1e3:.1f} ms]", file=sys.stderr)
