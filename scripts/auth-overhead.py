"""What the cluster token costs per internal gRPC call: the same unary call, on the same machine,
with and without the token's interceptors (client and server), in alternating rounds.

    .venv/bin/python scripts/auth-overhead.py --calls 2000 --rounds 6

prints the median microseconds per call of each configuration, round by round, and their
difference (median and range over the rounds). A request crosses about seven internal calls
(prefill Submit, PrefillDone, decode Submit, PullKv on the gRPC transport, Release, RequestDone,
and a heartbeat's share), so its added latency is about seven times the per-call difference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from splitserve.common.auth import NO_AUTH, ClusterAuth, new_token
from splitserve.common.rpc import bind, make_server, open_channel

METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, context) -> bytes:
    return request


async def _start(auth: ClusterAuth) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = make_server(auth)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    port = bind(server, "127.0.0.1", 0, auth.server_credentials())
    await server.start()
    return server, open_channel(f"127.0.0.1:{port}", auth, "prefill")


async def _time_calls(channel: grpc.aio.Channel, calls: int) -> float:
    """Median microseconds of one call, over calls sequential calls."""
    echo = channel.unary_unary(METHOD)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await echo(b"x" * 64, timeout=5)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


async def main(args: argparse.Namespace) -> None:
    configs = {"no token": await _start(NO_AUTH), "token": await _start(ClusterAuth(new_token()))}
    results: dict[str, list[float]] = {name: [] for name in configs}
    for name, (_, channel) in configs.items():
        await _time_calls(channel, 200)  # warm up both before measuring either
    for round_number in range(args.rounds):
        order = list(configs) if round_number % 2 == 0 else list(reversed(configs))
        for name in order:
            results[name].append(await _time_calls(configs[name][1], args.calls))
        print(f"round {round_number + 1}: " + ", ".join(f"{n} {results[n][-1]:.1f} us" for n in configs))
    diffs = [t - n for t, n in zip(results["token"], results["no token"])]
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.1f} us per call "
              f"(rounds {min(values):.1f}-{max(values):.1f})")
    print(f"token - no token: median {statistics.median(diffs):+.1f} us per call "
          f"(rounds {min(diffs):+.1f} to {max(diffs):+.1f}); about 7 calls per request: "
          f"{7 * statistics.median(diffs):+.0f} us per request")
    for server, channel in configs.values():
        await channel.close()
        await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per round (default: 2000)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, alternating the order (default: 6)")
    asyncio.run(main(parser.parse_args()))
