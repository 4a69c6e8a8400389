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


def test_a_worker_pins_itself_to_its_cores():
    import subprocess
    import sys

    cpu = min(os.sched_getaffinity(0))
    code = ("import argparse, os, torch; from splitserve.common.engine_args import apply_threads; "
            f"apply_threads(argparse.Namespace(cpus=[{cpu}], threads=None)); "
            "print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == [f"[{cpu}]", "1"]
