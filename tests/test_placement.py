"""How `splitserve up` places workers on CPU cores, and how a process pins itself (--cpus)."""

import argparse
import os

import pytest

from splitserve.cli import build_parser
from splitserve.commands.up import config_from_args, split_cpus
from splitserve.common.engine_args import cpu_list


def test_cpu_lists_parse_like_taskset():
    assert cpu_list("0-3,6") == [0, 1, 2, 3, 6]
    assert cpu_list("2,1,1") == [1, 2]
    for bad in ("", "a", "3-x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(bad)


def test_cores_are_split_evenly_in_order_and_shared_when_too_few():
    assert split_cpus([0, 1], 2) == [[0], [1]]
    assert split_cpus([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert split_cpus([0, 1], 1) == [[0, 1]]
    assert split_cpus([0, 1], 3) == [[0], [1], [0]]


def _config(tmp_path, *argv):
    return config_from_args(build_parser().parse_args(["up", "--log-dir", str(tmp_path), *argv]))


def test_a_colocated_worker_gets_the_cores_the_disaggregated_workers_share(tmp_path):
    disaggregated = _config(tmp_path, "--cpus", "0-1")
    assert disaggregated.worker_names == ["prefill-0", "decode-0"]
    assert disaggregated.worker_cpus == ((0,), (1,))
    colocated = _config(tmp_path, "--cpus", "0-1", "--mode", "colocated")
    assert colocated.worker_names == ["colocated-0"] and colocated.worker_cpus == ((0, 1),)
    assert colocated.chunk_size is None
    assert _config(tmp_path, "--mode", "chunked").chunk_size == 256
    assert _config(tmp_path, "--mode", "chunked", "--chunk-size", "64").chunk_size == 64
    with pytest.raises(ValueError, match="chunked"):
        _config(tmp_path, "--chunk-size", "64")
    layered = _config(tmp_path, "--cpus", "0-1", "--mode", "layered")
    assert layered.worker_names == ["colocated-0"] and layered.prefill_slice_ms == 30.0
    assert layered.chunk_size is None and colocated.prefill_slice_ms is None
    assert "layered prefill, slices of 30 ms" in layered.describe()
    assert _config(tmp_path, "--mode", "layered", "--prefill-slice-ms", "12.5").prefill_slice_ms == 12.5
    with pytest.raises(ValueError, match="--mode layered"):
        _config(tmp_path, "--mode", "colocated", "--prefill-slice-ms", "20")


def test_a_worker_pins_itself_to_its_cores():
    import subprocess
    import sys

    cpu = min(os.sched_getaffinity(0))
    code = ("import argparse, os, torch; from splitserve.common.engine_args import apply_threads; "
            f"apply_threads(argparse.Namespace(cpus=[{cpu}], threads=None)); "
            "print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == [f"[{cpu}]", "1"]


def test_mode_auto_starts_the_placement_the_planner_predicts_best(tmp_path, capsys, monkeypatch):
    """`up --mode auto` plans on its cores with the shipped profile (the preset brings its SLOs), says
    what it chose and what each mode would give, and starts exactly that placement."""
    from splitserve.commands import auto

    monkeypatch.setattr(auto, "AUTO_NUM_REQUESTS", 100)  # a third of the simulation: nothing here needs it
    chosen = []
    plan_once = auto.choose
    monkeypatch.setattr(auto, "choose", lambda args, cores: chosen.append(plan_once(args, cores)) or chosen[-1])
    config = _config(tmp_path, "--cpus", "0-1", "--mode", "auto", "--workload", "w2")
    (choice,) = chosen
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("auto: "))
    assert "for w2 at TTFT <= 4.474 s, TPOT <= 0.0919 s, 90% attainment" in line and line == choice.describe()
    placement, candidate = choice.placement, choice.best.candidate
    assert choice.best.max_rate == max(choice.per_mode.values()) > 0
    assert set(choice.per_mode) == {"disaggregated", "colocated", "chunked", "layered"}
    if placement.mode.value == "disaggregated":
        assert (config.num_prefill, config.num_decode, config.num_colocated) == (placement.num_prefill,
                                                                                placement.num_decode, 0)
        assert [len(c) for c in config.worker_cpus] == ([placement.prefill_degree] * placement.num_prefill
                                                       + [placement.decode_degree] * placement.num_decode)
    else:
        assert (config.num_colocated, config.num_prefill) == (placement.num_prefill, 0)
        assert (config.chunk_size is not None) == (placement.mode.value == "chunked")
        assert (config.prefill_slice_ms is not None) == (placement.mode.value == "layered")
    engine = config.engine_argv
    assert engine[engine.index("--token-budget") + 1] == str(candidate.token_budget)
    assert engine[engine.index("--max-num-seqs") + 1] == str(candidate.max_num_seqs)


def test_mode_auto_needs_slos_and_the_workload_flags_need_mode_auto(tmp_path, monkeypatch):
    from splitserve.commands import auto

    monkeypatch.setattr(auto, "AUTO_NUM_REQUESTS", 100)
    with pytest.raises(ValueError, match="--ttft-slo and --tpot-slo"):
        _config(tmp_path, "--mode", "auto", "--input-len", "256", "--output-len", "64")
    with pytest.raises(ValueError, match="give --mode auto"):
        _config(tmp_path, "--workload", "w1")
    with pytest.raises(ValueError, match="fixes its lengths"):
        _config(tmp_path, "--mode", "auto", "--workload", "w1", "--input-len", "100")
    with pytest.raises(ValueError, match="no placement"):  # a TTFT below any prefill of 1,024 tokens
        _config(tmp_path, "--cpus", "0-1", "--mode", "auto", "--input-len", "1024", "--output-len", "8",
                "--ttft-slo", "0.01", "--tpot-slo", "0.5")


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_twice():
    """A port from the kernel's ephemeral range could go to a worker binding port 0 before the
    gateway binds it (a CI run lost a cluster so)."""
    from splitserve.common.net import PORT_FLOOR, _ephemeral_low, free_port

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(PORT_FLOOR <= p < _ephemeral_low() for p in ports)


def test_up_reads_an_answer_that_is_not_http_as_not_ready():
    """Another server on the gateway's port (a gRPC one answers with HTTP/2 frames) must not crash
    the launcher's readiness check: it raised http.client.BadStatusLine."""
    import socket
    import threading

    from splitserve.commands.up import is_ready

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer():
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x00\x3f\xff\xff")  # an HTTP/2 frame

        thread = threading.Thread(target=answer)
        thread.start()
        assert is_ready(f"http://127.0.0.1:{server.getsockname()[1]}") is False
        thread.join(5)
