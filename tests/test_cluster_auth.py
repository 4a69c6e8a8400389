"""Cluster identity (issue 14): every internal RPC of a real `splitserve up` cluster refuses a
caller without the cluster's token (UNAUTHENTICATED, and nothing happens), and works with it; `up`
puts the token in its services' environment, never on a command line. Under mutual TLS (grpc_cluster
runs with --cluster-tls, its gRPC KV transport encrypted), a caller without a certificate from the
cluster's CA cannot even connect, and each method is taken only from the roles that call it.

Before, any process that could reach a port could register a fake worker, drain a real one, or
pull any request's KV cache by id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from conftest import start_cluster, stop_cluster
from test_cluster import MODEL, _post
from test_poison_request import _redis_url, _scheduler_pid
from test_up_supervision import _argv, _descendants

from splitserve.common.auth import (
    CALLER_ROLES,
    REDIS_PASSWORD_ENV,
    TLS_DIR_ENV,
    TOKEN_ENV,
    ClusterAuth,
    api_key_from_args,
    check_token,
    cluster_auth_from_args,
    new_token,
)
from splitserve.common.certs import ROLES, load_cluster_tls, role_of, write_cluster_certs
from splitserve.common.net import free_port, host_is_peer
from splitserve.common.rpc import add_health, bind, make_server, open_blocking_channel, open_channel
from splitserve.v1 import common_pb2, decode_pb2, gateway_pb2, gateway_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from splitserve.v1 import scheduler_pb2
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
        with grpc_cluster.channel(address) as channel:  # a member's certificate, not its token
            assert _call(channel, path, streams, b"", metadata) == grpc.StatusCode.UNAUTHENTICATED, path
        seen.add(path)
    assert len(seen) == 18  # 9 scheduler, 6 prefill (PullKv included), 3 decode RPCs


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
        with grpc.insecure_channel(address) as channel:  # not even a TLS handshake
            assert _call(channel, path, streams, request.SerializeToString(), grpc_cluster.metadata) \
                == grpc.StatusCode.UNAVAILABLE, path
        for role in ("decode", "admin"):  # decode may pull and release, with the token only
            with grpc_cluster.channel(address, role) as channel:
                code = _call(channel, path, streams, request.SerializeToString(), ())
            assert code == grpc.StatusCode.UNAUTHENTICATED, path
    assert sorted(w.worker.instance_id for w in grpc_cluster.workers()) == ["decode-0", "prefill-0"]
    assert not any(w.draining for w in grpc_cluster.workers())
    status, reply = _post(grpc_cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply


def test_with_the_token_internal_calls_work_and_health_stays_open(grpc_cluster):
    with grpc_cluster.channel(grpc_cluster.scheduler_address) as channel:
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
    plays the scheduler: it submits a request with a capability it chose, while the real one is
    paused (it would abort at once a request it does not know)."""
    address = _addresses(grpc_cluster)["prefill-0"]
    capability = new_token()
    request = common_pb2.QueuedRequest(
        request_id="capability-test", prompt_token_ids=[1, 504, 3156, 314] * 8, reply_stream="test:capability",
        sampling=common_pb2.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4), kv_capability=capability)
    as_scheduler, scheduler_pid = grpc_cluster.as_scheduler(), _scheduler_pid(grpc_cluster.scheduler_address)
    os.kill(scheduler_pid, signal.SIGSTOP)
    try:
        _play_the_scheduler(grpc_cluster, address, request, capability, as_scheduler)
    finally:
        os.kill(scheduler_pid, signal.SIGCONT)


def _play_the_scheduler(grpc_cluster, address: str, request, capability: str, as_scheduler) -> None:
    # The scheduler's certificate submits; a decode server's pulls and releases (mutual TLS roles).
    with grpc_cluster.channel(address, "scheduler", server="prefill") as channel, \
            grpc_cluster.channel(address, "decode", server="prefill") as puller:
        stub, decode = prefill_pb2_grpc.PrefillStub(channel), prefill_pb2_grpc.PrefillStub(puller)
        without = common_pb2.QueuedRequest(request_id="no-capability", prompt_token_ids=[1, 2, 3],
                                           reply_stream="test:capability", sampling=request.sampling)
        with pytest.raises(grpc.RpcError) as refused:  # its KV would be open to anyone guessing its id
            stub.Submit(without, timeout=30, metadata=as_scheduler)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.Submit(request, timeout=30, metadata=as_scheduler)
        deadline = time.monotonic() + 30
        while (held := stub.GetStats(common_pb2.StatsRequest(), timeout=5, metadata=grpc_cluster.metadata)).num_held != 1:
            assert time.monotonic() < deadline, held
            time.sleep(0.05)
        for wrong in ("", new_token()):
            with pytest.raises(grpc.RpcError) as pulled:
                list(decode.PullKv(prefill_pb2.PullKvRequest(request_id="capability-test", capability=wrong),
                                 timeout=10, metadata=grpc_cluster.metadata))
            assert pulled.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as released:
                decode.Release(prefill_pb2.ReleaseRequest(request_id="capability-test", capability=wrong),
                             timeout=10, metadata=grpc_cluster.metadata)
            assert released.value.code() == grpc.StatusCode.PERMISSION_DENIED
        after = stub.GetStats(common_pb2.StatsRequest(), timeout=5, metadata=grpc_cluster.metadata)
        assert after.num_held == 1 and after.num_free_blocks == held.num_free_blocks
        chunks = list(decode.PullKv(prefill_pb2.PullKvRequest(request_id="capability-test", capability=capability),
                                  timeout=10, metadata=grpc_cluster.metadata))
        assert sum(len(c.data) for c in chunks) > 0
        decode.Release(prefill_pb2.ReleaseRequest(request_id="capability-test", capability=capability),
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
    with grpc_cluster.channel(grpc_cluster.scheduler_address, "decode") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            scheduler_pb2_grpc.SchedulerStub(channel).Register(elsewhere, timeout=10, metadata=grpc_cluster.metadata)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "10.11.12.13:5000" in refused.value.details()
    assert sorted(w.worker.instance_id for w in grpc_cluster.workers()) == ["decode-0", "prefill-0"]


def test_a_worker_s_step_histograms_are_checked_before_the_gateways_export_them(grpc_cluster):
    """The scheduler passes workers' step histograms on to the gateways' /metrics: Register and
    Heartbeat refuse any a worker could not have made, and the registry keeps the worker's last good stats."""
    good = common_pb2.StepHistogram(kind=common_pb2.STEP_KIND_DECODE, batch_min=1, counts=[1] + [0] * 22,
                                    wall_s=0.004, cpu_s=0.004, num_tokens=1)
    decode, prefill, mixed = common_pb2.STEP_KIND_DECODE, common_pb2.STEP_KIND_PREFILL, common_pb2.STEP_KIND_MIXED
    bad = {"counts": common_pb2.StepHistogram(kind=decode, batch_min=1, counts=[1] * 5000),
           "batch": common_pb2.StepHistogram(kind=decode, batch_min=7, counts=[0] * 23),
           "kind": common_pb2.StepHistogram(kind=9, batch_min=1, counts=[0] * 23),
           "negative": common_pb2.StepHistogram(kind=prefill, batch_min=2, counts=[-1] + [0] * 22),
           "sum": common_pb2.StepHistogram(kind=mixed, batch_min=2, counts=[0] * 23, wall_s=float("nan"))}
    with grpc_cluster.channel(grpc_cluster.scheduler_address, "decode") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        worker = next(w.worker for w in grpc_cluster.workers() if w.worker.role == scheduler_pb2.WORKER_ROLE_DECODE)
        for what, histogram in [*bad.items(), ("repeated", good), ("too many", good)]:
            steps = {"repeated": [good, good], "too many": [good] * 28}.get(what, [histogram])
            stats = common_pb2.WorkerStats(num_blocks=100, num_free_blocks=100, steps=steps)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Heartbeat(scheduler_pb2.HeartbeatRequest(instance_id=worker.instance_id, stats=stats),
                               timeout=10, metadata=grpc_cluster.metadata)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert "step histogram" in refused.value.details(), what
            with pytest.raises(grpc.RpcError) as refused:
                stub.Register(scheduler_pb2.RegisterRequest(worker=worker, stats=stats), timeout=10,
                              metadata=grpc_cluster.metadata)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    assert all(len(w.stats.steps) <= 27 and all(len(h.counts) == 23 for h in w.stats.steps)
               for w in grpc_cluster.workers())


def test_a_worker_s_cache_listing_is_bounded_by_its_kv_cache(grpc_cluster):
    """The scheduler keeps each worker's cached block keys for KV-aware routing: a heartbeat listing
    more than the worker's KV blocks, or a registration with an oversized hash namespace, is refused."""
    with grpc_cluster.channel(grpc_cluster.scheduler_address, "prefill") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        worker = next(w for w in grpc_cluster.workers() if w.worker.role == scheduler_pb2.WORKER_ROLE_PREFILL)
        assert worker.worker.prefix_cache_namespace.endswith("|bfloat16|16")  # model, dtype, block size
        stats = common_pb2.WorkerStats(num_blocks=4, num_free_blocks=4)
        listing = scheduler_pb2.HeartbeatRequest(instance_id=worker.worker.instance_id, stats=stats,
                                                 cached_blocks=scheduler_pb2.CachedBlocks(keys=range(5)))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Heartbeat(listing, timeout=10, metadata=grpc_cluster.metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "5 cached blocks listed" in refused.value.details()
        info = scheduler_pb2.WorkerInfo()
        info.CopyFrom(worker.worker)
        info.prefix_cache_namespace = "n" * 1025
        with pytest.raises(grpc.RpcError) as refused:
            stub.Register(scheduler_pb2.RegisterRequest(worker=info, stats=worker.stats), timeout=10,
                          metadata=grpc_cluster.metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prefix_cache_namespace" in refused.value.details()
        info.CopyFrom(worker.worker)
        info.instance_id = "prefill-layout-0"  # refused or not, never the real worker's entry
        info.kv_layout.block_size = 0  # divided by in decode placement: the scheduler's dispatch loop died
        with pytest.raises(grpc.RpcError) as refused:
            stub.Register(scheduler_pb2.RegisterRequest(worker=info, stats=worker.stats), timeout=10,
                          metadata=grpc_cluster.metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "kv_layout" in refused.value.details()


def test_under_mutual_tls_a_stranger_cannot_connect_even_with_the_token(grpc_cluster, tmp_path):
    """No certificate, or one from another CA: the handshake fails, no RPC (health included) runs."""
    write_cluster_certs(tmp_path / "other")
    stranger = ClusterAuth(grpc_cluster.token, load_cluster_tls(tmp_path / "other" / "scheduler"))
    for name, path, streams, address in _every_rpc(grpc_cluster):
        with grpc.insecure_channel(address) as plain, \
                open_blocking_channel(address, stranger, name.split("-")[0]) as forged:
            for channel in (plain, forged):
                assert _call(channel, path, streams, b"", grpc_cluster.metadata) == grpc.StatusCode.UNAVAILABLE, path
    assert sorted(w.worker.instance_id for w in grpc_cluster.workers()) == ["decode-0", "prefill-0"]


def test_under_mutual_tls_each_method_is_taken_only_from_the_roles_that_call_it(grpc_cluster):
    """A member's certificate of another role gets PERMISSION_DENIED before the handler runs (the
    request, empty, is never looked at): a decode server cannot Submit to a prefill server, the
    gateway cannot pull KV or register a worker. The roles that call a method get past the check."""
    checked = 0
    for name, path, streams, address in _every_rpc(grpc_cluster):
        allowed = CALLER_ROLES.get(path)
        assert allowed is not None, f"{path} has no callers: every caller would be refused"
        for role in sorted(set(ROLES) - allowed):
            with grpc_cluster.channel(address, role) as channel:
                code = _call(channel, path, streams, b"", grpc_cluster.metadata)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (path, role)
            checked += 1
    assert checked >= 40
    # Allowed roles reach the handler: the scheduler aborts an unknown request (found=False).
    with grpc_cluster.channel(_addresses(grpc_cluster)["prefill-0"], "scheduler") as channel:
        assert not prefill_pb2_grpc.PrefillStub(channel).Abort(
            common_pb2.AbortRequest(request_id="no-such-request"), timeout=10, metadata=grpc_cluster.as_scheduler()).found
    # A worker registers only as what its certificate names: a prefill server's cannot enrol a decode server.
    as_decode = scheduler_pb2.RegisterRequest(
        worker=scheduler_pb2.WorkerInfo(instance_id="fake-decode", role=scheduler_pb2.WORKER_ROLE_DECODE,
                                        grpc_address="127.0.0.1:1", model=MODEL),
        stats=common_pb2.WorkerStats(num_blocks=10**9, num_free_blocks=10**9))
    with grpc_cluster.channel(grpc_cluster.scheduler_address, "prefill") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            scheduler_pb2_grpc.SchedulerStub(channel).Register(as_decode, timeout=10, metadata=grpc_cluster.metadata)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "prefill" in refused.value.details()
    assert sorted(w.worker.instance_id for w in grpc_cluster.workers()) == ["decode-0", "prefill-0"]
    # Nor can a decode server's certificate speak for a prefill server (heartbeat, report, hand back, drain).
    with grpc_cluster.channel(grpc_cluster.scheduler_address, "decode") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for call, request in ((stub.Heartbeat, scheduler_pb2.HeartbeatRequest(instance_id="prefill-0")),
                              (stub.HandBack, scheduler_pb2.HandBackRequest(request_id="x", instance_id="prefill-0")),
                              (stub.Drain, scheduler_pb2.DrainRequest(instance_id="prefill-0", finished=True))):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=10, metadata=grpc_cluster.metadata)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, call
    assert not any(w.draining for w in grpc_cluster.workers())


def test_under_mutual_tls_a_client_checks_the_servers_role(grpc_cluster, tmp_path):
    """A client dials a role, not just a member: the prefill server's certificate does not pass for
    the scheduler's (a member that redirected traffic could otherwise pose as another), and the
    admin certificate cannot serve at all."""
    prefill = _addresses(grpc_cluster)["prefill-0"]
    request = common_pb2.StatsRequest().SerializeToString()
    with grpc_cluster.channel(prefill, "admin", server="scheduler") as channel:
        assert _call(channel, "/splitserve.v1.Prefill/GetStats", False, request, grpc_cluster.metadata) \
            == grpc.StatusCode.UNAVAILABLE
    with grpc_cluster.channel(prefill, "admin", server="prefill") as channel:
        assert _call(channel, "/splitserve.v1.Prefill/GetStats", False, request, grpc_cluster.metadata) \
            == grpc.StatusCode.OK

    async def serve_as(role: str) -> grpc.StatusCode:
        auth = ClusterAuth(None, load_cluster_tls(grpc_cluster.tls_dir / role))
        server = make_server(auth)
        add_health(server)
        port = bind(server, "127.0.0.1", 0, auth.server_credentials())
        await server.start()
        try:
            client = ClusterAuth(None, load_cluster_tls(grpc_cluster.tls_dir / "decode"))
            channel = open_channel(f"127.0.0.1:{port}", client, role)
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            finally:
                await channel.close()
        finally:
            await server.stop(0)
    assert asyncio.run(serve_as("scheduler")) == grpc.StatusCode.OK
    assert asyncio.run(serve_as("admin")) == grpc.StatusCode.UNAVAILABLE  # its certificate is for clients only


def test_a_second_gateway_serves_https_and_grpc_tls_to_clients(grpc_cluster, tmp_path):
    """--tls-cert/--tls-key: the edge speaks only TLS (a plaintext request gets no answer), with the
    cluster's gateway certificate here (made with --gateway-name 127.0.0.1), joined to the cluster as
    the gateway role."""
    gateway_dir = grpc_cluster.tls_dir / "gateway"
    http_port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "splitserve.cli", "gateway", "--redis-url", _redis_url(grpc_cluster.scheduler_address),
            "--scheduler", grpc_cluster.scheduler_address, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--tls-cert", str(gateway_dir / "tls.crt"), "--tls-key", str(gateway_dir / "tls.key")]
    env = {**grpc_cluster.env, TLS_DIR_ENV: str(gateway_dir)}
    with open(tmp_path / "gateway.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        context = ssl.create_default_context(cafile=str(gateway_dir / "ca.crt"))
        url = f"https://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/ready", timeout=5, context=context) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()[-3000:]
            time.sleep(0.5)
        request = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 3}).encode())
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] >= 1
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ready", timeout=5).read()
        credentials = grpc.ssl_channel_credentials(root_certificates=(gateway_dir / "ca.crt").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", credentials) as channel:
            replies = list(gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(prompt="hi", max_tokens=3, temperature=0.0, ignore_eos=True), timeout=60))
        assert replies[-1].usage.completion_tokens == 3
    finally:
        process.terminate()
        process.wait(30)


def test_the_images_health_check_dials_with_the_services_own_certificate(grpc_cluster):
    """Under mutual TLS, Kubernetes' gRPC probes cannot connect; splitserve-healthcheck (the mtls
    overlay's probe) dials with the pod's certificate and sees SERVING, and without it fails."""
    script = Path(__file__).resolve().parent.parent / "deploy" / "images" / "healthcheck.py"
    env = {**os.environ, "SPLITSERVE_HOST": "127.0.0.1",
           "SPLITSERVE_PORT": grpc_cluster.scheduler_address.rpartition(":")[2]}
    env.pop(TLS_DIR_ENV, None)
    plain = subprocess.run([sys.executable, str(script), "grpc"], env=env, capture_output=True, text=True, timeout=30)
    assert plain.returncode == 1, plain
    tls = subprocess.run([sys.executable, str(script), "grpc"], capture_output=True, text=True, timeout=30,
                         env={**env, TLS_DIR_ENV: str(grpc_cluster.tls_dir / "scheduler")})
    assert tls.returncode == 0 and "healthy" in tls.stdout, tls


def test_a_gateway_told_to_require_an_api_key_does_not_start_without_one():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSERVE_API_KEY")}
    result = subprocess.run([sys.executable, "-m", "splitserve.cli", "gateway", "--redis-url", "redis://127.0.0.1:1/0"],
                            env={**env, "SPLITSERVE_REQUIRE_API_KEY": "1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--require-api-key" in result.stderr, result.stderr


def test_certs_are_checked_when_loaded(tmp_path):
    """A service refuses to start on certificates that are not the cluster's: another CA's, a key
    that is not the certificate's, a name with no role. `splitserve certs` keeps keys private."""
    write_cluster_certs(tmp_path / "a")
    write_cluster_certs(tmp_path / "b")
    assert load_cluster_tls(tmp_path / "a" / "decode").role == "decode"
    assert (tmp_path / "a" / "decode" / "tls.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a" / "ca.key").stat().st_mode & 0o777 == 0o600
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "a" / "decode", mixed)
    shutil.copy(tmp_path / "b" / "ca.crt", mixed / "ca.crt")
    with pytest.raises(ValueError, match="not signed"):
        load_cluster_tls(mixed)
    shutil.copy(tmp_path / "a" / "ca.crt", mixed / "ca.crt")
    shutil.copy(tmp_path / "a" / "prefill" / "tls.key", mixed / "tls.key")
    with pytest.raises(ValueError, match="not the key"):
        load_cluster_tls(mixed)
    with pytest.raises(ValueError, match="cannot read"):
        load_cluster_tls(tmp_path / "a")  # the CA's folder holds no tls.crt
    assert role_of("splitserve-scheduler") == "scheduler" and role_of("splitserve-root") is None
    assert role_of("scheduler") is None
    write_cluster_certs(tmp_path / "one-run", keep_ca_key=False)  # up --cluster-tls: nothing left to sign with
    assert not (tmp_path / "one-run" / "ca.key").exists() and load_cluster_tls(tmp_path / "one-run" / "gateway")


@pytest.mark.parametrize("argv, fragment", [
    (["--redis-url", "redis://:hunter2-password@127.0.0.1:6379/0"], "command line"),
    (["--redis-username", "app"], "ACL user"),
    (["--insecure-cluster", "--cluster-tls"], "insecure-cluster"),
])
def test_up_refuses_settings_that_would_leak_or_not_work(argv, fragment, monkeypatch):
    from splitserve.cli import build_parser
    from splitserve.commands.up import config_from_args

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    with pytest.raises(ValueError, match=fragment):
        config_from_args(build_parser().parse_args(["up", *argv]))


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
    """Nor does up's own command line hold them: the key comes from a file, the token from the
    environment, and the Redis password is up's own, made for this run."""
    key_file = tmp_path / "api-key"
    key_file.write_text("sk-test-key-that-must-stay-hidden\n")
    # On every interface: workers then advertise the host name, while they reach the scheduler over
    # loopback, and must still be let in.
    cluster = start_cluster(tmp_path, "--mode", "colocated", "--api-key-file", str(key_file), "--host", "0.0.0.0",
                            give_redis_password=False)
    try:
        lines = [" ".join(_argv(pid)) for pid in [cluster.process.pid, *_descendants(cluster.process.pid)]]
        assert any("gateway" in line for line in lines) and any("scheduler" in line for line in lines)
        scheduler = next(pid for pid in _descendants(cluster.process.pid) if "scheduler" in _argv(pid))
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{scheduler}/environ").read_text().split("\0") if "=" in item)
        redis_password = environ[REDIS_PASSWORD_ENV]  # up's own: the test gave none
        assert len(redis_password) >= 32
        assert not [line for line in lines if cluster.token in line or "sk-test-key-that-must-stay" in line
                    or redis_password in line]
        # up's private Redis asks for its password: a local user cannot read the prompts or add requests.
        with redis.Redis.from_url(_redis_url(cluster.scheduler_address)) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.xlen("splitserve:requests")
        status, reply = _post(cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2},
                              headers={"Authorization": "Bearer sk-test-key-that-must-stay-hidden"})
        assert status == 200, reply
        assert _post(cluster.http_url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})[0] == 401
        # Flushing every worker's prefix cache is the API key holder's too (here, the colocated worker's).
        assert _post(cluster.http_url + "/reset_prefix_cache", {})[0] == 401
        status, reset = _post(cluster.http_url + "/reset_prefix_cache", {},
                              headers={"Authorization": "Bearer sk-test-key-that-must-stay-hidden"})
        assert (status, reset["num_workers"], reset["num_failed"]) == (200, 1, 0), reset
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
