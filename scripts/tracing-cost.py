"""What tracing costs a service's process per request, on this machine.

Records the spans one disaggregated request makes (11: gateway 3, scheduler 2, prefill 3, decode 3),
REQUESTS times, through splitserve's tracer as the services use it: off (NO_TRACER, the default),
and on, exporting over OTLP/gRPC to a collector in a child process (which keeps nothing). Counts the
whole process's CPU time (the exporter's thread included) until every span has been sent (flushed
every 100 requests, so the exporter's queue never overflows), and prints microseconds per request,
alternating off and on REPEAT times. "Off" includes this loop's own work.

    .venv/bin/python scripts/tracing-cost.py [--requests 5000] [--repeat 3]
    .venv/bin/python scripts/tracing-cost.py --sink PORT   # only the collector, for scripts/auth-latency.sh
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from splitserve.common.net import free_port
from splitserve.common.tracing import NO_TRACER, Tracer, tracer_from

SINK = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb, trace_service_pb2_grpc as rpc
class Sink(rpc.TraceServiceServicer):
    def Export(self, request, context):
        return pb.ExportTraceServiceResponse()
server = grpc.server(ThreadPoolExecutor(2))
rpc.add_TraceServiceServicer_to_server(Sink(), server)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""
# The spans of one disaggregated request besides its request span (all under it here)
SPANS = ["admit", "queue", "placement", "decode placement", "batch wait", "prefill", "kv hold",
         "admission wait", "kv transfer", "decode"]


def one_request(tracer: Tracer, i: int) -> None:
    now = time.time()
    root = tracer.start("request", "", now, root=True, **{"gen_ai.request.id": f"cmpl-{i}"})
    for name in SPANS:
        tracer.record(name, root.traceparent, now, now + 0.001, **{"gen_ai.request.id": f"cmpl-{i}",
                                                                    "splitserve.worker": "prefill-0"})
    root.set(**{"gen_ai.usage.input_tokens": 128, "gen_ai.usage.output_tokens": 64})
    root.end(now + 0.002)


def cpu_per_request(tracer: Tracer, requests: int) -> float:
    """Microseconds of this process's CPU per request, until its spans are all sent."""
    started = time.process_time()
    for i in range(requests):
        one_request(tracer, i)
        if i % 100 == 99:  # the exporter's work counts too, and no span is dropped
            tracer.flush()
    tracer.flush()
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sink", type=int, default=None, metavar="PORT",
                        help="only run the collector that keeps nothing, on PORT, until killed")
    args = parser.parse_args()
    if args.sink is not None:
        os.execv(sys.executable, [sys.executable, "-c", SINK, str(args.sink)])
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "100")
        tracer = tracer_from(f"http://127.0.0.1:{port}", "bench")
        cpu_per_request(tracer, 200)  # warm up: imports, the channel
        results = {"off": [], "on": []}
        for _ in range(args.repeat):
            results["off"].append(cpu_per_request(NO_TRACER, args.requests))
            results["on"].append(cpu_per_request(tracer, args.requests))
        for name, values in results.items():
            print(f"tracing {name}: {statistics.median(values):8.1f} us CPU per request "
                  f"({len(SPANS) + 1} spans; runs {', '.join(f'{v:.1f}' for v in values)})")
        tracer.shutdown()
    finally:
        sink.terminate()


if __name__ == "__main__":
    main()
