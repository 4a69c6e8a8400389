"""The scheduler's placement choices: pure, so exact instance ids."""

import pytest

from splitserve.services.scheduler.registry import Registry

from splitserve.queue.streams import connect
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb

UNUSED_REDIS = "redis://127.0.0.1:1/0"  # a client that never connects: these tests publish nothing
LAYOUT = pb.KvLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=16, dtype="bfloat16")


@pytest.fixture
def aborted(monkeypatch) -> list[tuple[str, str]]:
    """The (worker, request) of every Abort the scheduler sends, instead of sending it."""
    from splitserve.services.scheduler.server import SchedulerServer

    calls = []

    async def abort(self, instance_id, request_id):
        calls.append((instance_id, request_id))

    monkeypatch.setattr(SchedulerServer, "_abort", abort)
    return calls


def _worker(registry, name, role, token_budget=100, free_blocks=10, running=0):
    info = spb.WorkerInfo(instance_id=name, role=role, token_budget=token_budget, kv_layout=LAYOUT,
                          kv_transport=pb.KV_TRANSPORT_UCX)
    return registry.register(info, pb.WorkerStats(num_free_blocks=free_blocks, num_running=running), now=0.0)


def test_prefill_goes_to_the_least_loaded_server_with_room():
    reg = Registry(queue_factor=2.0)
    a = _worker(reg, "p-a", spb.WORKER_ROLE_PREFILL)
    b = _worker(reg, "p-b", spb.WORKER_ROLE_PREFILL)
    a.assigned["r1"] = 50
    assert reg.pick_prefill(60).instance_id == "p-b"
    b.assigned["r2"] = 150
    assert reg.pick_prefill(150).instance_id == "p-a"  # 50 + 150 <= 2 budgets
    assert reg.pick_prefill(151) is None  # neither has room: it waits in the queue, in order


def test_a_prompt_longer_than_the_budget_runs_on_an_idle_server():
    reg = Registry(queue_factor=2.0)
    _worker(reg, "p-a", spb.WORKER_ROLE_PREFILL, token_budget=100)
    assert reg.pick_prefill(1000).instance_id == "p-a"


def test_decode_goes_to_the_most_free_blocks_counting_what_was_just_sent():
    reg = Registry()
    a = _worker(reg, "d-a", spb.WORKER_ROLE_DECODE, free_blocks=10)
    _worker(reg, "d-b", spb.WORKER_ROLE_DECODE, free_blocks=8)
    handle = pb.KvHandle(layout=LAYOUT, transport=pb.KV_TRANSPORT_UCX)
    assert reg.pick_decode(handle).instance_id == "d-a"
    a.pending_blocks = 3
    assert reg.pick_decode(handle).instance_id == "d-b"
    assert reg.heartbeat("d-a", pb.WorkerStats(num_free_blocks=10), now=1.0)
    assert reg.pick_decode(handle).instance_id == "d-a"  # the heartbeat's stats include what was sent


def test_decode_ties_break_on_load_and_layouts_must_match():
    reg = Registry()
    _worker(reg, "d-a", spb.WORKER_ROLE_DECODE, free_blocks=10, running=5)
    _worker(reg, "d-b", spb.WORKER_ROLE_DECODE, free_blocks=10, running=1)
    assert reg.pick_decode(pb.KvHandle(layout=LAYOUT, transport=pb.KV_TRANSPORT_UCX)).instance_id == "d-b"
    other = pb.KvLayout(num_layers=3, num_kv_heads=1, head_dim=8, block_size=16, dtype="bfloat16")
    assert reg.pick_decode(pb.KvHandle(layout=other, transport=pb.KV_TRANSPORT_UCX)) is None
    assert reg.pick_decode(pb.KvHandle(layout=LAYOUT, transport=pb.KV_TRANSPORT_GRPC)) is None


def test_silent_workers_expire_and_unknown_heartbeats_are_refused():
    reg = Registry()
    _worker(reg, "p-a", spb.WORKER_ROLE_PREFILL)
    _worker(reg, "d-a", spb.WORKER_ROLE_DECODE)
    reg.heartbeat("d-a", pb.WorkerStats(), now=4.0)
    assert reg.expired(now=6.0, timeout_s=5.0) == ["p-a"]
    assert not reg.heartbeat("nobody", pb.WorkerStats(), now=6.0)


def test_a_dropped_worker_s_requests_go_back_to_the_front_in_arrival_order():
    import asyncio

    from splitserve.services.scheduler.config import SchedulerConfig
    from splitserve.services.scheduler.server import SchedulerServer, Stage, Tracked

    async def scenario():
        config = SchedulerConfig("127.0.0.1", 0, "redis://unused", "s0", 2.0, 5.0, 60.0)
        server = SchedulerServer(config, stream=None, redis=connect(UNUSED_REDIS))
        server.leading.set()  # the leader, as a lone scheduler is once it took over
        worker = _worker(server.registry, "p-a", spb.WORKER_ROLE_PREFILL)
        for i, rid in enumerate(["r1", "r2", "r3", "r4"]):
            server.tracked[rid] = Tracked(f"{i}-0".encode(), pb.QueuedRequest(request_id=rid))
        server.queue.extend(["r4"])  # r1..r3 were assigned, r4 still waits
        for rid in ["r3", "r1", "r2"]:
            server.tracked[rid].stage, server.tracked[rid].prefill_id = Stage.PREFILL, "p-a"
            worker.assigned[rid] = 10
        server.drop_worker("p-a")
        return server

    server = asyncio.run(scenario())
    assert list(server.queue) == ["r1", "r2", "r3", "r4"]
    assert all(t.stage is Stage.QUEUED and t.prefill_id is None for t in server.tracked.values())
    assert "p-a" not in server.registry.workers


def test_colocated_workers_are_placed_like_prefill_servers():
    reg = Registry(queue_factor=2.0)
    a = _worker(reg, "c-a", spb.WORKER_ROLE_COLOCATED)
    _worker(reg, "c-b", spb.WORKER_ROLE_COLOCATED)
    _worker(reg, "d", spb.WORKER_ROLE_DECODE)
    a.assigned["r1"] = 30
    assert reg.pick_prefill(10).instance_id == "c-b"
    a.assigned["r1"] = 0  # prefilled, decoding on c-a: a tie on tokens goes to the worker with fewer requests
    assert reg.pick_prefill(10).instance_id == "c-b"
    assert reg.pick_decode(pb.KvHandle(layout=LAYOUT, transport=pb.KV_TRANSPORT_UCX)).instance_id == "d"


def test_a_draining_worker_is_placed_nothing_new():
    reg = Registry(queue_factor=2.0)
    a = _worker(reg, "p-a", spb.WORKER_ROLE_PREFILL)
    _worker(reg, "p-b", spb.WORKER_ROLE_PREFILL).assigned["r1"] = 50
    d = _worker(reg, "d-a", spb.WORKER_ROLE_DECODE, free_blocks=10)
    _worker(reg, "d-b", spb.WORKER_ROLE_DECODE, free_blocks=2)
    handle = pb.KvHandle(layout=LAYOUT, transport=pb.KV_TRANSPORT_UCX)
    assert reg.pick_prefill(10).instance_id == "p-a" and reg.pick_decode(handle).instance_id == "d-a"
    a.draining = d.draining = True
    assert reg.pick_prefill(10).instance_id == "p-b"  # busier, but taking work
    assert reg.pick_decode(handle).instance_id == "d-b"


def _scheduler_with(*workers):
    from splitserve.services.scheduler.config import SchedulerConfig
    from splitserve.services.scheduler.server import SchedulerServer

    class Stream:
        acked: list[bytes] = []

        async def ack(self, entry_id: bytes) -> None:
            self.acked.append(entry_id)

    class Replies:  # what the clients' gateways would be told
        published: list = []

        async def publish(self, channel, event) -> None:
            self.published.append(event)

    server = SchedulerServer(SchedulerConfig("127.0.0.1", 0, "redis://unused", "s0", 2.0, 5.0, 60.0),
                             stream=Stream(), redis=connect(UNUSED_REDIS))

    server.leading.set()  # the leader, as a lone scheduler is once it took over
    server.replies = Replies()
    for name, role in workers:
        info = spb.WorkerInfo(instance_id=name, role=role, token_budget=100, kv_layout=LAYOUT,
                              kv_transport=pb.KV_TRANSPORT_UCX, grpc_address="127.0.0.1:1")
        server.registry.register(info, pb.WorkerStats(num_free_blocks=10), now=0.0)
    return server


def _in_decode(server, rid, entry, prefill_id, decode_id):
    from splitserve.services.scheduler.server import Stage, Tracked

    done = spb.PrefillDoneRequest(request_id=rid, instance_id=prefill_id,
                                  kv=pb.KvHandle(layout=LAYOUT, transport=pb.KV_TRANSPORT_UCX, num_tokens=10))
    tracked = Tracked(entry, pb.QueuedRequest(request_id=rid, prompt_token_ids=[1] * 10), Stage.DECODE,
                      prefill_id, decode_id, done)
    server.tracked[rid] = tracked
    server.registry.workers[decode_id].assigned[rid] = 10
    return tracked


def test_a_request_handed_back_unpulled_goes_to_another_decode_server_and_a_pulled_one_to_the_queue():
    import asyncio

    from splitserve.services.scheduler.server import Stage

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE),
                                 ("d-b", spb.WORKER_ROLE_DECODE))
        unpulled = _in_decode(server, "r1", b"1-0", "p", "d-a")
        running = _in_decode(server, "r2", b"2-0", "p", "d-a")
        server.queue.append("r3")
        server.drain_worker("d-a", finished=False)
        server.hand_back(spb.HandBackRequest(request_id="r1", instance_id="d-a", kv_not_pulled=True))
        server.hand_back(spb.HandBackRequest(request_id="r2", instance_id="d-a"))
        server.hand_back(spb.HandBackRequest(request_id="r2", instance_id="d-a"))  # a retry: no-op
        server.hand_back(spb.HandBackRequest(request_id="r1", instance_id="d-a"))  # d-b has it now
        return server, unpulled, running

    server, unpulled, running = asyncio.run(scenario())
    assert server.registry.workers["d-a"].draining and server.registry.workers["d-a"].assigned == {}
    assert unpulled.stage is Stage.DECODE and unpulled.decode_id == "d-b"
    assert "r1" in server.registry.workers["d-b"].assigned
    assert running.stage is Stage.QUEUED and running.decode_id is None and running.done is None
    assert list(server.queue) == ["r2", "r3"]  # back at the front, from its prompt
    assert [w.worker.instance_id for w in server.cluster_state().workers if w.draining] == ["d-a"]


def test_a_finished_drain_forgets_the_worker_and_requeues_what_it_still_held():
    import asyncio

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE))
        _in_decode(server, "r1", b"1-0", "p", "d-a")
        server.drain_worker("d-a", finished=True)
        return server

    server = asyncio.run(scenario())
    assert "d-a" not in server.registry.workers and list(server.queue) == ["r1"]


def test_a_draining_scheduler_starts_nothing_and_waits_for_requests_in_flight():
    import asyncio

    from splitserve.services.scheduler.server import Tracked

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE))
        _in_decode(server, "r1", b"1-0", "p", "d-a")
        server.tracked["r2"] = Tracked(b"2-0", pb.QueuedRequest(request_id="r2", prompt_token_ids=[1]))
        server.queue.append("r2")
        dispatch = asyncio.ensure_future(server.dispatch_forever())
        drain = asyncio.ensure_future(server.drain(timeout_s=10))
        await asyncio.sleep(0.05)
        assert not drain.done()  # r1 is still decoding
        await server.request_done(spb.RequestDoneRequest(request_id="r1", instance_id="d-a",
                                                         finish_reason=pb.FINISH_REASON_LENGTH))
        drained = await asyncio.wait_for(drain, 1)
        dispatch.cancel()
        return server, drained

    server, drained = asyncio.run(scenario())
    assert drained and list(server.queue) == ["r2"]  # never assigned: left pending for a successor
    assert server.registry.workers["p"].assigned == {} and server.stream.acked == [b"1-0"]


def test_a_scheduler_drain_times_out_when_requests_do_not_finish():
    import asyncio

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE))
        _in_decode(server, "r1", b"1-0", "p", "d-a")
        return await server.drain(timeout_s=0.1)

    assert asyncio.run(scenario()) is False


def test_a_prefill_server_handing_back_unpulled_kv_requeues_the_request_and_stops_its_decode_server(aborted):
    import asyncio

    from splitserve.services.scheduler.server import Stage

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE))
        tracked = _in_decode(server, "r1", b"1-0", "p", "d-a")
        server.hand_back(spb.HandBackRequest(request_id="r1", instance_id="p"))
        await asyncio.sleep(0)
        return server, tracked

    server, tracked = asyncio.run(scenario())
    assert tracked.stage is Stage.QUEUED and list(server.queue) == ["r1"]
    assert server.registry.workers["d-a"].assigned == {} and aborted == [("d-a", "r1")]


def test_a_refusal_that_arrives_after_the_client_cancelled_changes_nothing():
    import asyncio

    import grpc

    from splitserve.services.scheduler.server import Stage, Tracked

    class Refused(grpc.aio.AioRpcError):
        def __init__(self):
            super().__init__(grpc.StatusCode.FAILED_PRECONDITION, None, None, "draining")

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d", spb.WORKER_ROLE_DECODE))
        tracked = Tracked(b"1-0", pb.QueuedRequest(request_id="r1", prompt_token_ids=[1]), Stage.PREFILL, "p")
        server.tracked["r1"] = tracked
        server.registry.workers["p"].assigned["r1"] = 1
        await server.cancel("r1")  # the client went away while Submit was in flight
        await server._rpc_failed(tracked, server.registry.workers["p"], Refused())
        return server

    server = asyncio.run(scenario())
    assert not server.queue and "r1" not in server.tracked


def test_a_prefill_server_that_goes_takes_its_unplaced_kv_with_it_and_a_request_requeued_too_often_fails():
    import asyncio

    from splitserve.services.scheduler.server import MAX_RUNS, Stage

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d", spb.WORKER_ROLE_DECODE))
        waiting = _in_decode(server, "r1", b"1-0", "p", "d")
        waiting.stage, waiting.decode_id = Stage.AWAITING_DECODE, None  # no decode server had room
        server.registry.workers["d"].assigned.clear()
        server.drain_worker("p", finished=True)
        assert list(server.queue) == ["r1"] and waiting.stage is Stage.QUEUED
        server.queue.clear()
        server.tracked["r1"].runs = MAX_RUNS
        server._requeue([server.tracked["r1"]])
        await server.background.wait()
        return server

    server = asyncio.run(scenario())
    assert not server.queue and "r1" not in server.tracked  # failed for good, acknowledged
    failed, = server.replies.published
    assert failed.finish_reason == pb.FINISH_REASON_ERROR and "gave up" in failed.error


def _prefill_done_with(decode_transport: int = pb.KV_TRANSPORT_UCX, **kv_fields):
    """A leader with prefill server p and decode server d (over decode_transport), after p's
    PrefillDone for r1 (a 10-token prompt) with a KV handle in p's registered layout, transport and
    addresses but for kv_fields; returns it and the decode servers it submitted r1 to (nothing is
    sent)."""
    import asyncio

    from splitserve.services.scheduler.server import Stage, Tracked

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d", spb.WORKER_ROLE_DECODE))
        server.registry.workers["d"].info.kv_transport = decode_transport
        submitted = []
        server._submit_decode = lambda tracked, worker, submit, span: submitted.append(
            worker.instance_id) or asyncio.sleep(0)
        request = pb.QueuedRequest(request_id="r1", prompt_token_ids=[1] * 10, reply_stream="c")
        server.tracked["r1"] = Tracked(b"1-0", request, Stage.PREFILL, "p")
        fields = dict(request_id="r1", layout=LAYOUT, transport=pb.KV_TRANSPORT_UCX, num_tokens=10,
                      prefill_grpc_address="127.0.0.1:1", ucx_address="127.0.0.1:7000")
        kv = pb.KvHandle(**{**fields, **kv_fields})
        await server.prefill_done(spb.PrefillDoneRequest(request_id="r1", instance_id="p", kv=kv))
        await asyncio.sleep(0)
        return server, submitted

    return asyncio.run(scenario())


@pytest.mark.parametrize("grpc_address, ucx_address, accepted", [
    ("127.0.0.1:1", "127.0.0.1:7000", True),  # where the prefill server registered, its UCX beside it
    ("10.9.9.9:1", "127.0.0.1:7000", False),  # a decode server would call another machine
    ("127.0.0.1:1", "10.9.9.9:7000", False),  # and pull from another machine's listener
])
def test_a_kv_handle_must_name_its_prefill_servers_registered_addresses(grpc_address, ucx_address, accepted):
    """A prefill server (or a member forging its PrefillDone) cannot point a decode server at an
    address it did not register: the request fails, its client told why, and no decode server gets it."""
    from splitserve.services.scheduler.server import Stage

    server, submitted = _prefill_done_with(prefill_grpc_address=grpc_address, ucx_address=ucx_address)
    if accepted:
        assert submitted == ["d"] and server.tracked["r1"].stage is Stage.DECODE
    else:
        assert submitted == [] and "r1" not in server.tracked
        (event,) = server.replies.published
        assert event.finish_reason == pb.FINISH_REASON_ERROR and "did not register" in event.error


@pytest.mark.parametrize("change, why", [
    ({"layout": pb.KvLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=0, dtype="bfloat16")},
     "layout and transport it registered"),  # a ZeroDivisionError in decode placement before
    ({"transport": pb.KV_TRANSPORT_GRPC}, "layout and transport it registered"),  # no decode server took it
    ({"num_tokens": 11}, "holds 11 tokens for a prompt of 10"),
])
def test_a_kv_handle_its_prefill_server_s_registration_contradicts_fails_the_request(change, why):
    """The scheduler picks a decode server, and counts the blocks it will need, by the handle's
    layout and size: a handle that is not what its prefill server registered, or not the size of the
    prompt, fails the request with the reason instead of crashing the dispatch loop or waiting forever."""
    server, submitted = _prefill_done_with(**change)
    assert submitted == [] and "r1" not in server.tracked
    (event,) = server.replies.published
    assert event.finish_reason == pb.FINISH_REASON_ERROR and why in event.error


def test_a_kv_handle_no_registered_decode_server_takes_fails_the_request_at_once():
    """Prefill and decode servers configured with different KV transports (or dtypes, block sizes):
    a prefilled request fails with the reason, instead of waiting for a decode server until its
    client's idle timeout (504 after five minutes, 'the cluster sent nothing')."""
    server, submitted = _prefill_done_with(decode_transport=pb.KV_TRANSPORT_GRPC)
    assert submitted == [] and "r1" not in server.tracked
    (event,) = server.replies.published
    assert event.finish_reason == pb.FINISH_REASON_ERROR and "configured differently" in event.error


# -- reconciliation: what heartbeats say a worker holds ---------------------------------------------


def test_a_request_missing_from_two_heartbeats_after_its_submit_runs_again_and_a_stray_one_is_aborted(aborted):
    """The leader places r1 on d-a (its Submit answered at d-a's heartbeat count 5). The heartbeat
    after may have been built before d-a had it; the one after that may not: r1 missing from it
    means its report was lost with d-a's copy, and r1 runs again. d-a's copy of r9, which the
    scheduler does not know (finished, cancelled), is aborted there."""
    import asyncio

    from splitserve.services.scheduler.server import Stage

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE))
        decode = server.registry.workers["d-a"]
        tracked = _in_decode(server, "r1", b"1-0", "p", "d-a")
        decode.beats = 5
        server._submitted(tracked, decode)
        server.heartbeat(decode, set())  # 6: built before the Submit reached d-a, perhaps
        after_one = tracked.stage, list(server.queue)
        server.heartbeat(decode, {"r9"})  # 7: built after it: r1 is gone
        await asyncio.sleep(0)
        return server, tracked, after_one

    server, tracked, after_one = asyncio.run(scenario())
    assert after_one == (Stage.DECODE, [])
    assert tracked.stage is Stage.QUEUED and list(server.queue) == ["r1"] and tracked.runs == 2
    assert aborted == [("d-a", "r9")]


def test_held_requests_are_left_alone_and_a_prefill_server_s_copy_stops_counting_once_prefilled(aborted):
    import asyncio

    from splitserve.services.scheduler.server import Stage

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE))
        prefill, decode = server.registry.workers["p"], server.registry.workers["d-a"]
        tracked = _in_decode(server, "r1", b"1-0", "p", "d-a")
        server._submitted(tracked, decode)
        for _ in range(4):
            server.heartbeat(decode, {"r1"})
            server.heartbeat(prefill, {"r1"})  # its KV, until the decode server's pull releases it
        server.heartbeat(prefill, set())  # released: not the prefill server's to hold any more
        await asyncio.sleep(0)
        return tracked

    tracked = asyncio.run(scenario())
    assert tracked.stage is Stage.DECODE and tracked.runs == 1 and aborted == []


def test_a_standby_records_what_workers_hold_and_acts_on_nothing():
    server = _scheduler_with(("d-a", spb.WORKER_ROLE_DECODE))
    server.leading.clear()
    decode = server.registry.workers["d-a"]
    server.heartbeat(decode, {"r1", "r2"})
    assert decode.held == {"r1", "r2"} and decode.beats == 1 and not server.background._tasks


def test_the_leader_names_the_prefill_server_s_held_requests_whose_pull_it_awaits(aborted):
    """Prefilled requests waiting for a decode server, or queued at one until its memory frees, keep
    their KV on the prefill server: the leader's heartbeat answer names them, so their leases go on.
    Not a request still being prefilled, one it does not know (aborted there instead), nor anything
    of a decode server's; a standby names nothing."""
    import asyncio

    from splitserve.services.scheduler.server import Stage

    async def scenario():
        server = _scheduler_with(("p", spb.WORKER_ROLE_PREFILL), ("d-a", spb.WORKER_ROLE_DECODE))
        prefill, decode = server.registry.workers["p"], server.registry.workers["d-a"]
        _in_decode(server, "queued-at-decode", b"1-0", "p", "d-a")
        unplaced = _in_decode(server, "no-decode-yet", b"2-0", "p", "d-a")
        unplaced.waits(Stage.AWAITING_DECODE)
        unplaced.decode_id = None
        prefilling = _in_decode(server, "prefilling", b"3-0", "p", "d-a")
        prefilling.stage, prefilling.decode_id, prefilling.done = Stage.PREFILL, None, None
        held = {"queued-at-decode", "no-decode-yet", "prefilling", "unknown"}
        leader = server.heartbeat(prefill, held), server.heartbeat(decode, {"queued-at-decode"})
        await asyncio.sleep(0)
        server.leading.clear()
        return leader, server.heartbeat(prefill, held)

    (to_prefill, to_decode), from_standby = asyncio.run(scenario())
    assert sorted(to_prefill) == ["no-decode-yet", "queued-at-decode"]
    assert to_decode == [] and from_standby == []
    assert aborted == [("p", "unknown")]
