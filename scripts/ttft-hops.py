"""Where a request's time to first token goes at low load: sequential gRPC `Generate` requests to a
running gateway, each hop's P50 from the Timeline the last response carries (gateway, stream,
scheduler, prefill server) plus the client's own send and receive times.

    splitserve up &
    .venv/bin/python scripts/ttft-hops.py --address 127.0.0.1:50051 --requests 16

What docs/benchmarks.md's "Overhead at low load" hop tables were measured with. "TTFT minus prefill"
is the first token's arrival at the client less the request's own prefill step (as the prefill server
timed it): the time the hops add. The clocks are the machine's, so the gateway, workers and this
client must share one.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from splitserve.common.auth import NO_AUTH
from splitserve.common.engine_args import positive_float, positive_int
from splitserve.common.rpc import open_channel
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc

HOPS = ("client -> gateway", "gateway -> stream", "stream -> scheduler assignment",
        "assignment -> prefill start", "prefill step", "prefill end -> first token published",
        "first token -> client", "TTFT", "TTFT minus prefill", "TPOT")


async def one(stub, prompt: list[int], output_len: int) -> dict[str, float]:
    """One request's hops in seconds."""
    request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=output_len,
                                          min_tokens=output_len, ignore_eos=True, temperature=0.0)
    send, first, last, tokens, timeline = time.time(), None, None, 0, None
    async for response in stub.Generate(request):
        now = time.time()
        if response.token_ids:
            first = first or now
            last, tokens = now, tokens + len(response.token_ids)
        if response.HasField("timeline") and response.timeline.finish:
            timeline = response.timeline
    if first is None or timeline is None:
        raise RuntimeError("the stream carried no tokens or no final timeline")
    t = timeline
    return {"client -> gateway": t.arrival - send, "gateway -> stream": t.queued - t.arrival,
            "stream -> scheduler assignment": t.scheduled - t.queued,
            "assignment -> prefill start": t.prefill_start - t.scheduled,
            "prefill step": t.prefill_end - t.prefill_start,
            "prefill end -> first token published": t.first_token - t.prefill_end,
            "first token -> client": first - t.first_token, "TTFT": first - send,
            "TTFT minus prefill": (first - send) - (t.prefill_end - t.prefill_start),
            "TPOT": (last - first) / max(1, tokens - 1)}


async def run(args: argparse.Namespace) -> None:
    seed = random.randrange(2**32) if args.seed is None else args.seed
    print(f"prompt seed {seed}")
    rng = random.Random(seed)
    rows = []
    async with open_channel(args.address, NO_AUTH, "gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for i in range(args.requests + 1):  # the first one warms the path up and is not counted
            prompt = [rng.randrange(100, 40_000) for _ in range(args.input_len)]  # unique: no cache hit
            row = await one(stub, prompt, args.output_len)
            if i:
                rows.append(row)
            await asyncio.sleep(args.gap)
    for hop in HOPS:
        values = [row[hop] * 1e3 for row in rows]
        print(f"{hop:40s} P50 {statistics.median(values):8.2f} ms   "
              f"min {min(values):8.2f}   max {max(values):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051",
                        help="the gateway's gRPC address (default: %(default)s)")
    parser.add_argument("--requests", type=positive_int, default=16,
                        help="requests timed, one at a time (default: 16)")
    parser.add_argument("--input-len", type=positive_int, default=256,
                        help="random prompt token ids each (default: 256)")
    parser.add_argument("--output-len", type=positive_int, default=64,
                        help="output tokens each, forced (default: 64)")
    parser.add_argument("--gap", type=positive_float, default=0.3,
                        help="seconds between requests (default: 0.3)")
    parser.add_argument("--seed", type=int, default=None,
                        help="prompt seed (default: a new one each run: a prompt of an earlier run against "
                             "the same cluster would be served from its prefix cache)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
