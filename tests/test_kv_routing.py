"""KV-aware routing: the prefill placement's cost on hand-made registry states (exact ids and
counts), the scheduler's hashing of a prompt as each worker hashes it, and what it keeps of a
worker's cache between heartbeats."""

from splitserve.engine.block_manager import block_hashes, routing_key
from splitserve.services.scheduler.registry import Registry
from splitserve.services.scheduler.server import Tracked
from splitserve.v1 import common_pb2 as pb
from splitserve.v1 import scheduler_pb2 as spb

BLOCK = 16
LAYOUT = pb.KvLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=BLOCK, dtype="bfloat16")
NAMESPACE = "model|bfloat16|16"
PROMPT = list(range(1000, 1000 + 10 * BLOCK + 1))  # 161 tokens: 10 full blocks before the last token


def _worker(registry, name, namespace=NAMESPACE, role=spb.WORKER_ROLE_PREFILL, token_budget=2048):
    info = spb.WorkerInfo(instance_id=name, role=role, token_budget=token_budget, kv_layout=LAYOUT,
                          prefix_cache_namespace=namespace)
    return registry.register(info, pb.WorkerStats(num_blocks=100, num_free_blocks=100), now=0.0)


def _keys(tokens, salt=None, namespace=NAMESPACE):
    return [routing_key(h) for h in block_hashes(tokens, BLOCK, salt, namespace)]


def _tracked(prompt=PROMPT, salt=""):
    return Tracked(b"0-1", pb.QueuedRequest(request_id="r", prompt_token_ids=prompt, cache_salt=salt))


def _route(registry, tracked):
    worker, cached = registry.route_prefill(tracked.num_prompt_tokens, tracked.prefix_keys)
    return worker.instance_id, cached


def test_the_scheduler_hashes_a_prompt_as_the_worker_does_up_to_the_block_of_its_last_token():
    reg = Registry()
    worker = _worker(reg, "p-a")
    tracked = _tracked()
    assert tracked.prefix_keys(worker) == _keys(PROMPT)[:10] and len(_keys(PROMPT)) == 10
    # 160 tokens: the 10th block holds the last token
    assert _tracked(PROMPT[:-1]).prefix_keys(worker) == _keys(PROMPT)[:9]
    assert _tracked(salt="tenant").prefix_keys(worker) == _keys(PROMPT, "tenant")[:10] != _keys(PROMPT)[:10]
    other = _worker(reg, "p-b", namespace="other-model|bfloat16|16")
    assert tracked.prefix_keys(other) == _keys(PROMPT, namespace="other-model|bfloat16|16")[:10]
    assert tracked.prefix_keys(other) != tracked.prefix_keys(worker)
    assert tracked.prefix_keys(_worker(reg, "p-c", namespace="")) == []  # caching off there


def test_an_idle_request_goes_to_the_server_holding_its_longest_prefix():
    reg = Registry(queue_factor=2.0, request_tokens=32)
    a, b = _worker(reg, "p-a"), _worker(reg, "p-b")
    assert _route(reg, _tracked()) == ("p-a", 0)  # nothing cached: the first of equals
    reg.heartbeat("p-b", b.stats, now=1.0, cached_keys=_keys(PROMPT)[:8])
    reg.heartbeat("p-a", a.stats, now=1.0, cached_keys=_keys(PROMPT)[:3] + _keys(PROMPT)[4:10])
    assert _route(reg, _tracked()) == ("p-b", 8 * BLOCK)  # a lacks block 3: its run stops at 3
    assert _route(reg, _tracked(salt="tenant")) == ("p-a", 0)  # another salt: no block matches


def test_a_queue_outweighing_the_prefix_sends_the_request_elsewhere():
    reg = Registry(queue_factor=2.0, request_tokens=32)
    a, b = _worker(reg, "p-a"), _worker(reg, "p-b")
    reg.heartbeat("p-a", a.stats, now=1.0, cached_keys=_keys(PROMPT))
    # a: 128 queued + (161 - 160) + 32 = 161 > b: 0 + 161 + 0; ties go to the fewer requests.
    a.assigned["q"] = 128
    assert _route(reg, _tracked()) == ("p-b", 0)
    a.assigned["q"] = 127  # 160 < 161
    assert _route(reg, _tracked()) == ("p-a", 160)
    # The load term alone: each assigned request costs request_tokens, decoding ones (0 tokens) too.
    a.assigned.update({"d1": 0, "d2": 0, "d3": 0})
    assert _route(reg, _tracked()) == ("p-b", 0)  # 127 + 1 + 4 * 32 = 256 > 161


def test_room_counts_the_tokens_still_to_compute():
    reg = Registry(queue_factor=1.0, request_tokens=0)
    a = _worker(reg, "p-a", token_budget=100)
    reg.heartbeat("p-a", a.stats, now=1.0, cached_keys=_keys(PROMPT))
    a.assigned["q"] = 99
    assert _route(reg, _tracked()) == ("p-a", 160)  # 99 + 1 fits one budget; 161 would not
    a.assigned["q"] = 100
    assert reg.route_prefill(161, _tracked().prefix_keys) is None


def test_a_request_just_routed_counts_as_cached_there_until_a_heartbeat_after_it_left_lists_it():
    reg = Registry(queue_factor=2.0, request_tokens=0)
    a, _ = _worker(reg, "p-a"), _worker(reg, "p-b")
    first = _tracked()
    a.assigned["r1"], a.routed["r1"] = 161, first.prefix_keys(a)  # what the scheduler does on assigning
    assert _route(reg, _tracked()) == ("p-b", 0)  # a's queue: 161 + 1 > 161
    del a.assigned["r1"]  # its prefill ended
    assert _route(reg, _tracked()) == ("p-a", 160)  # not listed yet, but routed there
    reg.heartbeat("p-a", a.stats, now=1.0)  # built before it ended, perhaps: still counted
    assert _route(reg, _tracked()) == ("p-a", 160)
    reg.heartbeat("p-a", a.stats, now=2.0, cached_keys=[])  # after it: the list is the truth (evicted)
    assert _route(reg, _tracked()) == ("p-a", 0) and a.routed == {}
    reg.heartbeat("p-a", a.stats, now=3.0, cached_keys=_keys(PROMPT)[:5])
    assert _route(reg, _tracked()) == ("p-a", 5 * BLOCK)
    reg.heartbeat("p-a", a.stats, now=4.0)  # unchanged: kept
    assert _route(reg, _tracked()) == ("p-a", 5 * BLOCK)


def test_draining_and_full_servers_are_skipped_whatever_they_hold():
    reg = Registry()
    a, _ = _worker(reg, "p-a"), _worker(reg, "p-b")
    reg.heartbeat("p-a", a.stats, now=1.0, cached_keys=_keys(PROMPT))
    a.full = True
    assert _route(reg, _tracked()) == ("p-b", 0)
    a.full, a.draining = False, True
    assert _route(reg, _tracked()) == ("p-b", 0)


def test_a_turn_goes_to_the_decode_server_holding_its_conversation_if_the_rest_fits():
    reg = Registry()
    a = _worker(reg, "d-a", role=spb.WORKER_ROLE_DECODE)
    b = _worker(reg, "d-b", role=spb.WORKER_ROLE_DECODE)
    handle = pb.KvHandle(layout=LAYOUT, num_tokens=len(PROMPT))  # + the first decode slot: 11 blocks
    reg.heartbeat("d-a", pb.WorkerStats(num_blocks=100, num_free_blocks=5), now=1.0,
                  cached_keys=_keys(PROMPT)[:7])
    reg.heartbeat("d-b", pb.WorkerStats(num_blocks=100, num_free_blocks=50), now=1.0)

    def route(keys=_tracked().prefix_keys):
        worker, cached = reg.route_decode(handle, keys)
        return worker.instance_id, cached

    assert route() == ("d-a", 7)  # 5 free + 7 cached hold the 11 blocks it needs
    assert route(None) == ("d-b", 0) and reg.pick_decode(handle) is b  # least-loaded: the most free
    a.pending_blocks = 2  # requests sent its way since: 3 + 7 < 11
    assert route() == ("d-b", 0)
