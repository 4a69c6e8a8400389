"""The gRPC client side of `splitserve generate`: stream one request through the gateway."""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from splitserve.commands.generate import print_summary
from splitserve.common.protoconv import FINISH_REASON_NAMES
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc


def build_request(args: argparse.Namespace) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature,
                                          top_p=args.top_p, ignore_eos=args.ignore_eos)
    if args.raw:
        request.prompt = args.prompt
    else:
        request.messages.add(role="user", content=args.prompt)
    if args.top_k is not None:
        request.top_k = args.top_k
    if args.seed is not None:
        request.seed = args.seed
    return request


def run_remote(args: argparse.Namespace) -> int:
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    start = time.perf_counter()
    times, last = [], None
    with grpc.insecure_channel(args.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for response in stub.Generate(build_request(args), metadata=metadata):
                if response.token_ids:
                    times.append(time.perf_counter())
                sys.stdout.write(response.text)
                sys.stdout.flush()
                last = response
        except grpc.RpcError as exc:
            hint = " (is a cluster running? `splitserve up`, or use --local)" \
                if exc.code() is grpc.StatusCode.UNAVAILABLE else ""
            raise ValueError(f"{exc.code().name}: {exc.details()}{hint}") from None
    sys.stdout.write("\n")
    _print_summary(last, start, times)
    return 0


def _print_summary(last, start: float, times: list[float]) -> None:
    if last is None or not times:
        return
    reason = FINISH_REASON_NAMES.get(last.finish_reason, "unknown")
    print_summary(last.usage.prompt_tokens, last.usage.completion_tokens, reason, start, times)
