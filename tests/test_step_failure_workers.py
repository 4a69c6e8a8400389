"""What the workers and the scheduler do with a failed step's ERROR output (issue 13): the client gets
FINISH_REASON_ERROR with the reason, the worker forgets the request, and the scheduler acknowledges it
without running it again anywhere. In process, with the Redis and gRPC edges replaced by recorders."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from splitserve.common.auth import NO_AUTH
from splitserve.engine import EngineConfig, FinishReason, LLMEngine
from splitserve.engine.request import StepOutput
from splitserve.queue.streams import connect
from splitserve.services.colocated.server import ColocatedServer, Running
from splitserve.services.decode.server import Admitted, DecodeServer
from splitserve.services.prefill.server import Held, PrefillServer
from splitserve.services.scheduler.config import SchedulerConfig
from splitserve.services.scheduler.server import SchedulerServer, Stage, Tracked
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import decode_pb2
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.engine_loop import StepResult

ERROR = "the engine step failed for this request: RuntimeError: injected"
FAILED = StepOutput("r", None, FinishReason.ERROR, ERROR)
CONFIG = SimpleNamespace(instance_id="w0", cluster_auth=NO_AUTH)
UNUSED_REDIS = "redis://127.0.0.1:1/0"  # a client that never connects: the recorders below publish


class Replies:
    """Stands in for ReplyPublisher: keeps the events and runs their follow-ups (the reports) at once."""

    def __init__(self) -> None:
        self.events: list[tuple[str, pb.TokenEvent]] = []
        self.follow_ups: list = []

    def send(self, events, then=None) -> None:
        self.events += events
        if then is not None:
            self.follow_ups.append(then())


class Link:
    """Stands in for SchedulerLink: keeps what is owed (at the step) and what is reported (after the
    events are out)."""

    def __init__(self) -> None:
        self.owed: list[tuple[type, str]] = []
        self.reports: list = []

    def owe(self, report_type, request_id: str) -> None:
        self.owed.append((report_type, request_id))

    async def report(self, done) -> None:
        self.reports.append(done)


@pytest.fixture(scope="module")
def engine(model_fp32):
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_bytes=8 << 20), loaded=model_fp32)


def request() -> pb.QueuedRequest:
    return pb.QueuedRequest(request_id="r", prompt_token_ids=[1, 2, 3], reply_stream="gw")


async def step_failed(server, num_emitted_before: int = 0):
    """Hand the server a step whose only output is r's failure; returns (event, report)."""
    server.replies, server.link = Replies(), Link()
    server._on_step(StepResult([FAILED], 1.0, 2.0, extra={}))
    [(report_type, owed_id)] = server.link.owed  # counted as held from the step on, till reported
    await asyncio.gather(*server.replies.follow_ups)
    [(channel, event)] = server.replies.events
    [report] = server.link.reports
    assert (report_type, owed_id) == (type(report), "r")
    assert channel == "gw" and "r" not in server.requests
    assert event.finish_reason == pb.FINISH_REASON_ERROR and event.error == ERROR
    assert list(event.token_ids) == [] and event.index == num_emitted_before
    assert report.request_id == "r" and report.finish_reason == pb.FINISH_REASON_ERROR
    assert report.error == ERROR
    return report


def test_the_prefill_server_tells_the_client_and_reports_prefill_done_error(engine):
    async def scenario():
        server = PrefillServer(CONFIG, engine, redis=connect(UNUSED_REDIS), kv_lease_s=60.0)
        server.requests["r"] = Held(request())
        report = await step_failed(server)
        assert isinstance(report, spb.PrefillDoneRequest) and list(report.output_token_ids) == []
        assert not report.HasField("kv")  # nothing held: no decode server is sent to pull

    asyncio.run(scenario())


@pytest.mark.parametrize("num_emitted, report_type",
                         [(0, spb.PrefillDoneRequest), (3, spb.RequestDoneRequest)])
def test_the_colocated_worker_reports_a_failure_before_or_after_the_first_token(engine, num_emitted,
                                                                                 report_type):
    async def scenario():
        server = ColocatedServer(CONFIG, engine, redis=connect(UNUSED_REDIS))
        server.requests["r"] = Running(request(), num_emitted=num_emitted)
        report = await step_failed(server, num_emitted)
        assert isinstance(report, report_type)
        if report_type is spb.RequestDoneRequest:
            assert report.num_output_tokens == num_emitted  # the failed step added none

    asyncio.run(scenario())


def test_the_decode_server_tells_the_client_and_reports_request_done_error(engine):
    async def scenario():
        server = DecodeServer(CONFIG, engine, redis=connect(UNUSED_REDIS), puller=None)
        server.requests["r"] = Admitted(decode_pb2.DecodeRequest(request=request()), num_emitted=2)
        report = await step_failed(server, 2)
        assert isinstance(report, spb.RequestDoneRequest) and report.num_output_tokens == 2

    asyncio.run(scenario())


class Stream:
    def __init__(self) -> None:
        self.acked: list[bytes] = []

    async def ack(self, entry_id: bytes) -> None:
        self.acked.append(entry_id)


@pytest.mark.parametrize("report", [
    spb.PrefillDoneRequest(request_id="r", instance_id="p0", finish_reason=pb.FINISH_REASON_ERROR,
                           error=ERROR),
    spb.RequestDoneRequest(request_id="r", instance_id="p0", finish_reason=pb.FINISH_REASON_ERROR,
                           error=ERROR),
])
def test_the_scheduler_acknowledges_a_failed_request_and_never_runs_it_again(report):
    async def scenario():
        config = SchedulerConfig("127.0.0.1", 0, "redis://unused", "s0", 2.0, 5.0, 60.0)
        server = SchedulerServer(config, stream=Stream(), redis=connect(UNUSED_REDIS))
        server.leading.set()  # the leader, as a lone scheduler is once it took over
        info = spb.WorkerInfo(instance_id="p0", role=spb.WORKER_ROLE_PREFILL, token_budget=100)
        worker = server.registry.register(info, pb.WorkerStats(num_free_blocks=10), now=0.0)
        server.tracked["r"] = Tracked(b"1-0", request(), Stage.PREFILL, prefill_id="p0")
        worker.assigned["r"] = 3
        if isinstance(report, spb.PrefillDoneRequest):
            await server.prefill_done(report)
        else:
            await server.request_done(report)
        assert server.stream.acked == [b"1-0"]
        assert "r" not in server.tracked and "r" not in server.queue and not worker.assigned
        server.drop_worker("p0")  # its worker going away later requeues nothing
        assert not server.queue

    asyncio.run(scenario())
