"""Cluster identity (issue 14, shared-token mode): every internal RPC of a real `splitserve up`
cluster refuses a caller without the cluster's token (UNAUTHENTICATED, and nothing happens), and
works with it; `up` puts the token in its services' environment, never on a command line.

Before, any process that could reach a port could register a fake worker, drain a real one, or
pull any request's KV cache by id.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from conftest import start_cluster, stop_cluster
from test_cluster import MODEL, _post
from test_up_supervision import _argv, _descendants

from splitserve.common.auth import (
    TOKEN_ENV,
    ClusterAuth,
    api_key_from_args,
    check_token,
    cluster_auth_from_args,
    new_token,
)
from splitserve.common.net import host_is_peer
from splitserve.v1 import common_pb2, decode_pb2, prefill_pb2, prefill_pb2_grpc, scheduler_pb2
from splitserve.v1 import scheduler_pb2_grpc

pytestmark = pytest.mark.timeout(180)
SERVICES = {  # where each internal service is served: (its proto module, its name)
    "scheduler": (scheduler_pb2, "Scheduler"),
    "prefill-0": (prefill_pb2, "Prefill"),
    "decode-0": (decode_pb2, "Decode"),
}


def _addresses(cluster) -> dict[str, str]:
    workers = {w.worker.instance_id: w.worker.grpc_address for w in cluster.workers()}
    return {"scheduler": cluster.scheduler_address, "prefill-0": workers["prefill-0"],
            "decode-0": workers["decode-0"]}


def _call(channel: grpc.Channel, path: str, streams: bool, request: bytes, metadata) -> grpc.StatusCode:
    """Call path with a serialized request (no deserializing: only the status matters)."""
    try:
        if streams:
            list(channel.unary_stream(path)(request, timeout=10, metadata=metadata))
        else:
            channel.unary_unary(path)(request, timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _every_rpc(cluster):
    """(service name, method path, whether it streams replies, address) for every internal RPC."""
    addresses = _addresses(cluster)
    for name, (module, service) in SERVICES.items():
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            yield name, f"/{method.containing_service.full_name}/{method.name}", method.server_streaming, \
                addresses[name]


@pytest.mark.parametrize("credentials", ["none", "wrong token", "two tokens"])
def test_every_internal_rpc_refuses_a_caller_without_the_cluster_token(grpc_cluster, credentials):
    metadata = {"none": (), "wrong token": (("x-splitserve-cluster-token", new_token()),),
                "two tokens": (("x-splitserve-cluster-token", new_token()),
                               ("x-splitserve-cluster-token", grpc_cluster.token))}[credentials]
    seen = set()
    for name, path, streams, address in _every_rpc(grpc_cluster):
        with grpc.insecure_channel(address) as channel:
            assert _call(channel, path, streams, b"", metadata) == grpc.StatusCode.UNAUTHENTICATED, path
        seen.add(path)
    assert len(seen) == 16  # 8 scheduler, 5 prefill (PullKv included), 3 decode RPCs


def test_forged_calls_change_nothing_and_the_cluster_serves_on(grpc_cluster):
    """The attacks of the issue, without the token: a fake decode worker claiming a huge cache, a
    drain of a real worker, a KV pull and a release by request id."""
    addresses = _addresses(grpc_cluster)
    fake = scheduler_pb2.RegisterRequest(
        worker=scheduler_pb2.WorkerInfo(instance_id="evil-decode", role=scheduler_pb2.WORKER_ROLE_DECODE,
                                        grpc_address="127.0.0.1:1", model=MODEL),
        stats=common_pb2.WorkerStats(num_blocks=10**9, num_free_blocks=10**9))
    attacks = [
        (addresses["scheduler"], "/splitserve.v1.Scheduler/Register", False, fake),
        (addresses["scheduler"], "/splitserve.v1.Scheduler/Drain", False,
         scheduler_pb2.DrainRequest(instance_id="decode-0", finished=True)),
        (addresses["prefill-0"], "/splitserve.v1.Prefill/PullKv", True, prefill_pb2.PullKvRequest(request_id="x")),
        (addresses["prefill-0"], "/splitserve.v1.Prefill/Release", False, prefill_pb2.ReleaseRequest(request_id="x")),
    ]
    for address, path, streams, request in attacks:
        with grpc.insecure_channel(address) as channel:
            code = _call(channel, path, streams, request.SerializeToString(), ())
        assert code == grpc.StatusCode.UNAUTHENTICATED, path
    assert sorted(w.worker.instance_id for w in grpc_cluster.workers()) == ["decode-0", "prefill-0"]
    assert not any(w.draining for w in grpc_cluster.workers())
    status, reply = _post(grpc_cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply


def test_with_the_token_internal_calls_work_and_health_stays_open(grpc_cluster):
    with grpc.insecure_channel(grpc_cluster.scheduler_address) as channel:
        state = scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
            scheduler_pb2.ClusterStateRequest(), timeout=5, metadata=grpc_cluster.metadata)
        assert {w.worker.instance_id for w in state.workers} == {"prefill-0", "decode-0"}
        # Container runtimes probe health without credentials; it tells only SERVING or not.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert set(grpc_cluster.worker_stats()) == {"prefill-0", "decode-0"}  # GetStats, with the token


def test_kv_of_a_held_request_needs_its_capability_besides_the_cluster_token(grpc_cluster):
    """With the cluster token but a wrong capability, PullKv and Release get PERMISSION_DENIED and the
    prefill server's blocks stay as they were; with the request's capability both work. The test
    plays the scheduler: it submits a request with a capability it chose."""
    address = _addresses(grpc_cluster)["prefill-0"]
    capability = new_token()
    request = common_pb2.QueuedRequest(
        request_id="capability-test", prompt_token_ids=[1, 504, 3156, 314] * 8, reply_channel="test:capability",
        sampling=common_pb2.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4), kv_capability=capability)
    with grpc.insecure_channel(address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        without = common_pb2.QueuedRequest(request_id="no-capability", prompt_token_ids=[1, 2, 3],
                                           reply_channel="test:capability", sampling=request.sampling)
        with pytest.raises(grpc.RpcError) as refused:  # its KV would be open to anyone guessing its id
            stub.Submit(without, timeout=30, metadata=grpc_cluster.metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.Submit(request, timeout=30, metadata=grpc_cluster.metadata)
        deadline = time.monotonic() + 30
        while (held := stub.GetStats(common_pb2.StatsRequest(), timeout=5, metadata=grpc_cluster.metadata)).num_held != 1:
            assert time.monotonic() < deadline, held
            time.sleep(0.05)
        for wrong in ("", new_token()):
            with pytest.raises(grpc.RpcError) as pulled:
                list(stub.PullKv(prefill_pb2.PullKvRequest(request_id="capability-test", capability=wrong),
                                 timeout=10, metadata=grpc_cluster.metadata))
            assert pulled.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as released:
                stub.Release(prefill_pb2.ReleaseRequest(request_id="capability-test", capability=wrong),
                             timeout=10, metadata=grpc_cluster.metadata)
            assert released.value.code() == grpc.StatusCode.PERMISSION_DENIED
        after = stub.GetStats(common_pb2.StatsRequest(), timeout=5, metadata=grpc_cluster.metadata)
        assert after.num_held == 1 and after.num_free_blocks == held.num_free_blocks
        chunks = list(stub.PullKv(prefill_pb2.PullKvRequest(request_id="capability-test", capability=capability),
                                  timeout=10, metadata=grpc_cluster.metadata))
        assert sum(len(c.data) for c in chunks) > 0
        stub.Release(prefill_pb2.ReleaseRequest(request_id="capability-test", capability=capability),
                     timeout=10, metadata=grpc_cluster.metadata)
        final = stub.GetStats(common_pb2.StatsRequest(), timeout=5, metadata=grpc_cluster.metadata)
        assert final.num_held == 0 and final.num_free_blocks == final.num_blocks


def test_a_member_cannot_register_a_worker_at_an_address_it_does_not_connect_from(grpc_cluster):
    """With the cluster token, Register still checks that the advertised host is the caller's own:
    otherwise a member could point the scheduler's prompts and KV handles at another machine."""
    elsewhere = scheduler_pb2.RegisterRequest(
        worker=scheduler_pb2.WorkerInfo(instance_id="decode-elsewhere", role=scheduler_pb2.WORKER_ROLE_DECODE,
                                        grpc_address="10.11.12.13:5000", model=MODEL),
        stats=common_pb2.WorkerStats(num_blocks=100, num_free_blocks=100))
    with grpc.insecure_channel(grpc_cluster.scheduler_address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            scheduler_pb2_grpc.SchedulerStub(channel).Register(elsewhere, timeout=10, metadata=grpc_cluster.metadata)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "10.11.12.13:5000" in refused.value.details()
    assert sorted(w.worker.instance_id for w in grpc_cluster.workers()) == ["decode-0", "prefill-0"]


@pytest.mark.parametrize("host, peer, same", [
    ("127.0.0.1", "ipv4:127.0.0.1:50000", True),
    ("localhost", "ipv6:[::1]:50000", True),  # both loopback
    ("127.0.0.1", "ipv6:[::ffff:127.0.0.1]:50000", True),
    ("10.11.12.13", "ipv4:127.0.0.1:50000", False),  # not this machine's
    ("localhost", "ipv4:10.11.12.13:50000", False),  # every resolved address must be the peer's
    ("127.0.0.1", "ipv4:10.11.12.13:50000", False),
    ("no-such-host.invalid", "ipv4:127.0.0.1:50000", False),
    ("127.0.0.1", "unix:/tmp/socket", False),
])
def test_an_advertised_host_must_resolve_to_the_peer(host, peer, same):
    assert asyncio.run(host_is_peer(host, peer)) is same


def test_up_gives_its_services_the_token_and_api_key_only_through_their_environment(tmp_path):
    """Nor does up's own command line hold them: the key comes from a file, the token from the environment."""
    key_file = tmp_path / "api-key"
    key_file.write_text("sk-test-key-that-must-stay-hidden\n")
    # On every interface: workers then advertise the host name, while they reach the scheduler over
    # loopback, and must still be let in.
    cluster = start_cluster(tmp_path, "--mode", "colocated", "--api-key-file", str(key_file), "--host", "0.0.0.0")
    try:
        lines = [" ".join(_argv(pid)) for pid in [cluster.process.pid, *_descendants(cluster.process.pid)]]
        assert any("gateway" in line for line in lines) and any("scheduler" in line for line in lines)
        assert not [line for line in lines if cluster.token in line or "sk-test-key-that-must-stay" in line]
        status, reply = _post(cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2},
                              headers={"Authorization": "Bearer sk-test-key-that-must-stay-hidden"})
        assert status == 200, reply
        assert _post(cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})[0] == 401
    finally:
        assert stop_cluster(cluster) == 0


def test_a_token_comes_from_a_file_or_the_environment_and_must_be_long(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    none = argparse.Namespace(cluster_token_file=None)
    assert not cluster_auth_from_args(none).enabled
    token = new_token()
    monkeypatch.setenv(TOKEN_ENV, token)
    assert cluster_auth_from_args(none) == ClusterAuth(token)
    assert token not in repr(ClusterAuth(token))  # configs that hold it may be logged whole
    path = tmp_path / "token"
    path.write_text(f"{'f' * 40}\n")
    assert cluster_auth_from_args(argparse.Namespace(cluster_token_file=str(path))) == ClusterAuth("f" * 40)
    for bad in ("short", "x" * 31, "has space" * 5, "é" * 40):
        with pytest.raises(ValueError, match="cluster token"):
            check_token(bad, "test")
    with pytest.raises(ValueError, match="cannot read"):
        cluster_auth_from_args(argparse.Namespace(cluster_token_file=str(tmp_path / "missing")))


def test_an_api_key_comes_from_a_file_or_the_flag(tmp_path):
    path = tmp_path / "key"
    path.write_text("sk-from-a-file\n")
    assert api_key_from_args(argparse.Namespace(api_key="sk-flag", api_key_file=str(path))) == "sk-from-a-file"
    assert api_key_from_args(argparse.Namespace(api_key="sk-flag", api_key_file=None)) == "sk-flag"
    assert api_key_from_args(argparse.Namespace(api_key="", api_key_file=None)) is None
    path.write_text("\n")
    with pytest.raises(ValueError, match="API key"):
        api_key_from_args(argparse.Namespace(api_key=None, api_key_file=str(path)))
