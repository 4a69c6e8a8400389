"""`splitserve up` supervises its services: one that is killed comes back (same name, new pid) and
the cluster serves again; and when `up` itself is SIGKILLed, none of its processes outlives it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RunningCluster, start_cluster, stop_cluster

from splitserve.commands.up import is_ready, startup_failure
from splitserve.common.net import free_port
from splitserve.common.proc import RestartPolicy, Supervised, log_size

pytestmark = pytest.mark.timeout(420)
MODEL = "SmolLM2-135M-Instruct"


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of pid from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below root, children of children included."""
    parents = {int(p.name): stat for p in Path("/proc").iterdir() if p.name.isdigit()
               if (stat := _stat(int(p.name))) is not None}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, started) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def _alive(pid: int, started: int) -> bool:
    """The same process (not a reused pid) still exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[1] not in ("Z", "X")


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _service_pids(up_pid: int) -> dict[str, int]:
    """Service name (prefill-0, gateway, redis, ...) -> pid, for the live children of up."""
    services = {}
    for pid, started in _descendants(up_pid).items():
        argv = _argv(pid)
        if not _alive(pid, started) or not argv:
            continue
        if "--instance-id" in argv:
            services[argv[argv.index("--instance-id") + 1]] = pid
        elif "--log-json" in argv:
            services[argv[argv.index("--log-json") + 1]] = pid
        elif "redis-server" in Path(argv[0]).name:
            services["redis"] = pid
    return services


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.25)


def _complete(http_url: str) -> dict:
    body = {"model": MODEL, "prompt": "The sea is", "max_tokens": 4, "ignore_eos": True}
    request = urllib.request.Request(http_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        return json.loads(response.read())


def _port_is_free(port: int) -> bool:
    """Whether a new server could listen on port (SO_REUSEADDR, as servers do: TIME_WAIT is no owner)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def test_restart_delays_double_up_to_the_cap_and_reset_after_a_healthy_run(tmp_path):
    assert [RestartPolicy().delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    policy = RestartPolicy(first_s=1, max_s=30, reset_after_s=60)

    def crash() -> subprocess.Popen:
        return subprocess.Popen(["false"])  # exits 1 at once, like a crash

    service = Supervised("prefill-0", crash, tmp_path / "prefill-0.log", crash(), started_at=0.0)
    service.process.wait()
    assert service.tend(policy, 1.0) == (f"prefill-0 exited with code 1; restarting in 1 s (crash 1 in a row); "
                                         f"see {tmp_path / 'prefill-0.log'}")
    assert service.tend(policy, 1.5) is None  # still backing off
    assert service.tend(policy, 2.0).startswith("prefill-0 restarted (pid ")
    service.process.wait()
    assert "restarting in 2 s (crash 2 in a row)" in service.tend(policy, 3.0)
    service.tend(policy, 5.0)
    service.process.wait()
    assert "restarting in 1 s (crash 1 in a row)" in service.tend(policy, 65.0)  # up 60 s: healthy again


def test_an_owned_child_whose_parent_is_already_gone_does_not_start():
    # The race PR_SET_PDEATHSIG alone misses: the parent died before the child asked for the signal.
    out = subprocess.run([sys.executable, "-m", "splitserve.common.proc", "1", "--", "echo", "started"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "started" not in out.stdout and "is gone" in out.stderr


def test_killed_worker_and_gateway_are_restarted_and_serve_again(grpc_cluster):
    """On conftest's shared cluster (its own start and stop took half of this test's time), whose
    teardown asserts that up still exits 0 on SIGTERM after the restarts."""
    cluster = grpc_cluster
    # start_cluster returned on up's own "ready": from here on, up restarts a service that exits
    before = _service_pids(cluster.process.pid)
    assert {"redis", "scheduler", "prefill-0", "decode-0", "gateway"} <= before.keys(), before
    for name in ("prefill-0", "gateway"):
        os.kill(before[name], signal.SIGKILL)

    def restarted() -> bool:
        now = _service_pids(cluster.process.pid)
        return all(now.get(name) not in (None, before[name]) for name in ("prefill-0", "gateway"))

    _wait_for(restarted, 30, "prefill-0 and the gateway restarted")
    assert cluster.process.poll() is None, "up exited"
    _wait_for(lambda: is_ready(cluster.http_url), 180, "the cluster ready again")
    completion = _complete(cluster.http_url)
    assert completion["usage"]["completion_tokens"] == 4, completion
    for name in ("prefill-0", "gateway"):
        assert f"{name} was killed by SIGKILL; restarting in 1 s" in cluster.output(), cluster.output()
        assert f"{name} restarted (pid" in cluster.output(), cluster.output()
    after = _service_pids(cluster.process.pid)
    assert after["decode-0"] == before["decode-0"] and after["scheduler"] == before["scheduler"]


def test_no_process_outlives_a_sigkilled_up(tmp_path):
    cluster = start_cluster(tmp_path, "--mode", "colocated")
    children = {}
    try:
        children = _descendants(cluster.process.pid)
        names = _service_pids(cluster.process.pid)
        assert {"redis", "scheduler", "colocated-0", "gateway"} <= names.keys(), names
        ports = [int(cluster.http_url.rsplit(":", 1)[1]), int(cluster.grpc_address.rsplit(":", 1)[1]),
                 int(cluster.scheduler_address.rsplit(":", 1)[1])]
        cluster.process.kill()
        cluster.process.wait(10)
        _wait_for(lambda: not [pid for pid, started in children.items() if _alive(pid, started)], 10,
                  f"every child of up gone: {children}")
        _wait_for(lambda: all(_port_is_free(port) for port in ports), 10, f"ports {ports} free")
    finally:
        for pid, started in children.items():
            if _alive(pid, started):  # only on failure: leave nothing behind for the next test
                os.kill(pid, signal.SIGKILL)
        if cluster.process.poll() is None:
            stop_cluster(cluster)


@pytest.mark.parametrize("taken, service, reason", [
    ("--http-port", "gateway", "[Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
                               "address already in use"),
    ("--scheduler-port", "scheduler", "cannot bind the gRPC server to 127.0.0.1:{port}: the port is in use")])
def test_a_service_that_fails_to_start_is_named_with_its_reason(tmp_path, taken, service, reason):
    """A port taken: up stops everything and says which service failed and why, in its own error (it
    said only '<service> exited during start-up; see <log folder>', and a gRPC port taken ended the
    service in a traceback), and the service stops what it had started before it exits."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        ports = {"--http-port": free_port(), "--grpc-port": free_port(), "--scheduler-port": free_port(),
                 taken: port}
        argv = [sys.executable, "-m", "splitserve.cli", "up", *(str(a) for p in ports.items() for a in p),
                "--log-dir", str(tmp_path), "--kv-cache-gb", "0.25", "--mode", "colocated"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    error = [line for line in done.stderr.splitlines() if line.startswith("splitserve: error: ")]
    assert len(error) == 1, done.stderr[-2000:]
    assert error[0].startswith(f"splitserve: error: {service} exited with code "), error
    assert f"during start-up: {reason.format(port=port)}" in error[0], error
    assert f"(log: {tmp_path / f'{service}.log'})" in error[0], error
    # The reason, not a crash's traceback or a teardown's noise (outside its JSON log lines) under it.
    log = (tmp_path / f"{service}.log").read_text().splitlines()
    raw = [line for line in log if not line.startswith("{")]
    assert not [line for line in raw if "Traceback" in line or "never awaited" in line], raw


def test_a_reused_log_folder_does_not_lend_an_older_runs_reason(tmp_path):
    """Logs are appended to: with --log-dir reused, a service that dies without a word (a signal, a
    crash) must not be given the error an earlier run of it printed."""
    log = tmp_path / "scheduler.log"
    log.write_text("splitserve: error: the reason an earlier run exited\n")
    start = log_size(log)
    with open(log, "ab") as out:
        suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        process = subprocess.Popen([sys.executable, "-c", suicide], stdout=out, stderr=subprocess.STDOUT)
    process.wait(30)
    said = startup_failure(Supervised("scheduler", lambda: process, log, process, log_start=start))
    assert said == f"was killed by SIGKILL during start-up; see {log}"
    with open(log, "a") as out:  # what this run printed is quoted
        out.write("splitserve: error: this run's reason\n")
    said = startup_failure(Supervised("scheduler", lambda: process, log, process, log_start=start))
    assert said == f"was killed by SIGKILL during start-up: this run's reason (log: {log})"
