"""The floor under the hops of a request's time to first token on this machine: the same kinds of
hand-off the cluster makes, timed bare, with nothing of splitserve's own work in them.

- a gRPC call (grpc.aio, the services' channel and server options and the cluster token's
  interceptors): the client's send to the server's handler starting (what client -> gateway and
  scheduler -> prefill server cost at least), and to the first streamed message back;
- a Redis stream entry (redis-py's asyncio client, as the services use it): XADD in one process to
  a blocked XREAD returning in another (gateway -> scheduler, and prefill server -> gateway);
- a thread hop inside one process (run_in_executor and back: the prefill server's hand-off to its
  engine thread, and the gateway's tokenizer threads for long prompts).

    .venv/bin/python scripts/hop-floor.py --samples 200

Each sample waits --gap seconds first, as requests at low load do (every hop then wakes an idle
process). The last line adds the floors up as `scripts/ttft-hops.py`'s chain makes them: two gRPC
calls to a handler, two Redis wakes, one streamed message back to the client and one thread hop.
What docs/benchmarks.md's floor figures were measured with ("On another machine" for Zen 5, "The
chain's floor on Zen 4").
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import time

import grpc
import redis.asyncio as aioredis

from splitserve.bench.loadgen.metrics import percentile
from splitserve.common.auth import ClusterAuth
from splitserve.common.engine_args import positive_float, positive_int
from splitserve.common.rpc import bind, make_server, open_channel
from splitserve.queue.redis_server import LocalRedis

METHOD = "/floor.Floor/Stream"


def serve_grpc(port: int, token: str, ready) -> None:
    """A server whose one method streams the handler's start time, then a second message."""
    async def main() -> None:
        server = make_server(ClusterAuth(token))

        async def stream(request: bytes, context):
            yield repr(time.time()).encode()
            yield b"done"

        handler = grpc.method_handlers_generic_handler("floor.Floor", {
            "Stream": grpc.unary_stream_rpc_method_handler(stream)})
        server.add_generic_rpc_handlers((handler,))
        bind(server, "127.0.0.1", port, None)
        await server.start()
        ready.set()
        await server.wait_for_termination()
    asyncio.run(main())


def read_stream(url: str, samples: int, ready, results) -> None:
    """Block on XREAD for samples entries (after one warm-up entry); each one's delay from its XADD
    (the time it carries)."""
    async def main() -> None:
        client, last, delays = aioredis.from_url(url), b"0-0", []  # a fresh Redis: every entry
        await client.ping()
        ready.set()
        while len(delays) < samples + 1:
            reply = await client.xread({"floor": last}, block=5000, count=16)
            now = time.time()
            for _, items in reply or ():
                for entry_id, fields in items:
                    last = entry_id
                    delays.append(now - float(fields[b"t"]))
        results.put(delays[1:])
    asyncio.run(main())


async def grpc_hops(port: int, token: str, samples: int, gap: float) -> tuple[list[float], list[float]]:
    to_handler, to_first = [], []
    async with open_channel(f"127.0.0.1:{port}", ClusterAuth(token), "gateway") as channel:
        call = channel.unary_stream(METHOD)
        for i in range(samples + 5):  # the first five warm the channel up
            await asyncio.sleep(gap)
            sent, first = time.time(), None
            async for message in call(b""):
                if first is None:
                    first, started = time.time(), float(message)
            if i >= 5:
                to_handler.append(started - sent)
                to_first.append(first - sent)
    return to_handler, to_first


async def redis_hops(url: str, samples: int, gap: float) -> list[float]:
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    reader = context.Process(target=read_stream, args=(url, samples, ready, results), daemon=True)
    reader.start()
    client = aioredis.from_url(url)
    await client.ping()
    if not await asyncio.to_thread(ready.wait, 60):
        raise SystemExit("the Redis reader did not start")
    for _ in range(samples + 1):  # the first is the reader's warm-up
        await asyncio.sleep(gap)
        await client.xadd("floor", {"t": repr(time.time())})
    delays = await asyncio.to_thread(results.get, True, 60)
    reader.join(10)
    await client.aclose()
    return delays


async def thread_hops(samples: int, gap: float) -> list[float]:
    loop, hops = asyncio.get_running_loop(), []
    await loop.run_in_executor(None, len, ())  # the pool's thread starts
    for _ in range(samples):
        await asyncio.sleep(gap)
        start = time.perf_counter()
        await loop.run_in_executor(None, len, ())
        hops.append(time.perf_counter() - start)
    return hops


def report(name: str, seconds: list[float]) -> float:
    values = sorted(s * 1e3 for s in seconds)
    p50 = percentile(values, 50)
    print(f"{name:55s} P50 {p50:6.2f} ms   P10 {percentile(values, 10):6.2f}   "
          f"P90 {percentile(values, 90):6.2f}")
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=positive_int, default=200, help="samples per hop (default: 200)")
    parser.add_argument("--gap", type=positive_float, default=0.02,
                        help="seconds idle before each sample (default: 0.02)")
    parser.add_argument("--port", type=positive_int, default=50990,
                        help="the gRPC server's port on 127.0.0.1 (default: 50990)")
    args = parser.parse_args()

    token = secrets.token_urlsafe(32)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    server = context.Process(target=serve_grpc, args=(args.port, token, ready), daemon=True)
    server.start()
    if not ready.wait(30):
        raise SystemExit("the gRPC server did not start")
    try:
        to_handler, to_first = asyncio.run(grpc_hops(args.port, token, args.samples, args.gap))
    finally:
        server.terminate()
        server.join(10)
    with LocalRedis() as redis:
        wakes = asyncio.run(redis_hops(redis.url, args.samples, args.gap))
    threads = asyncio.run(thread_hops(args.samples, args.gap))

    call = report("gRPC call: client send -> handler starts", to_handler)
    first = report("gRPC call: client send -> first streamed message", to_first)
    wake = report("Redis: XADD -> a blocked XREAD returns (two processes)", wakes)
    thread = report("thread hop: run_in_executor and back", threads)
    print(f"{'the TTFT chain: 2 calls, 2 wakes, 1 message back, 1 hop':55s} "
          f"P50 {2 * call + 2 * wake + (first - call) + thread:6.2f} ms (sum)")


if __name__ == "__main__":
    main()
