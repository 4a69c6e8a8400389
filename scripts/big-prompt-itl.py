"""Inter-token latency of running streams while huge prompts arrive at the same gateway.

    .venv/bin/python scripts/big-prompt-itl.py --url http://127.0.0.1:8000 --big-chars 8000000

starts --streams streaming completions (greedy, ignore_eos, --max-tokens each), then, one after
another, sends --big-prompts completions whose prompt is --big-chars characters, and prints the
streams' inter-token gaps (P50, P99, P99.9, max, and how many stalled 0.5 s or more) and what each
big request got. A gateway that tokenizes on
its event loop stalls every stream for as long as each big prompt takes to tokenize.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp


async def stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> list[float]:
    """The arrival times of one stream's chunks that carry text."""
    body = {"prompt": "Tell me a long story about the sea.", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    times = []
    async with session.post(url + "/v1/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.monotonic())
    return times


async def big_prompt(session: aiohttp.ClientSession, url: str, num_chars: int) -> str:
    started = time.monotonic()
    async with session.post(url + "/v1/completions", json={"prompt": "word " * (num_chars // 5),
                                                           "max_tokens": 1}) as response:
        body = await response.json(content_type=None)
    code = (body.get("error") or {}).get("code") or ""
    return f"HTTP {response.status} {code} in {time.monotonic() - started:.2f} s"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        streams = [asyncio.create_task(stream(session, args.url, args.max_tokens)) for _ in range(args.streams)]
        await asyncio.sleep(args.warmup)
        results = []
        for _ in range(args.big_prompts):
            results.append(await big_prompt(session, args.url, args.big_chars))
            await asyncio.sleep(args.gap)
        arrivals = await asyncio.gather(*streams)
    gaps = [(b - a) * 1000 for times in arrivals for a, b in zip(times, times[1:])]
    print(f"big prompts of {args.big_chars} characters: " + "; ".join(results))
    print(f"{args.streams} streams, {len(gaps)} inter-token gaps: P50 {statistics.median(gaps):.0f} ms, "
          f"P99 {percentile(gaps, 0.99):.0f} ms, P99.9 {percentile(gaps, 0.999):.0f} ms, "
          f"max {max(gaps):.0f} ms; {sum(g >= 500 for g in gaps)} gaps of 0.5 s or more")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's HTTP address")
    parser.add_argument("--streams", type=int, default=4, help="streams running meanwhile (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=300, help="tokens per stream (default: 300)")
    parser.add_argument("--big-prompts", type=int, default=3, help="huge prompts sent, one at a time (default: 3)")
    parser.add_argument("--big-chars", type=int, default=8_000_000, help="characters per huge prompt (default: 8 M)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of streaming before the first (default: 2)")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between huge prompts (default: 0.5)")
    asyncio.run(main(parser.parse_args()))
