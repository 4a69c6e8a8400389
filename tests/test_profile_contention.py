"""`splitserve profile --add-contention`: steps timed alone and beside busy cores, with real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.planner.latency import load_profile

SPLITSERVE = [sys.executable, "-m", "splitserve.cli"]
PROFILE = Path(__file__).parent / "data" / "planner-profile-2core.json"

pytestmark = pytest.mark.timeout(300)


def _load_processes() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_text().split("\0")
        except OSError:
            continue
        if "splitserve.planner.measure" in cmdline and "--load" in cmdline:
            found.append(entry)
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core beside the measured one")
def test_add_contention_times_each_shape_alone_and_beside_each_kind_of_busy_core(tmp_path):
    path = tmp_path / "profile.json"
    shutil.copy(PROFILE, path)
    before = load_profile(path)
    out = subprocess.run([*SPLITSERVE, "profile", "--add-contention", str(path), "--quick", "--repeat", "1"],
                         capture_output=True, text=True, timeout=280, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    profile = load_profile(path)
    one = profile.degree(1)
    assert one.contention.notes.startswith("measured by `splitserve profile`")
    samples = one.samples["contention"]
    assert set(samples) == {"alone", "beside prefill", "beside decode"}
    for condition in samples.values():  # the same quick shapes under every condition, each timed
        assert [s["lens"] for s in condition["prefill"]] == [[16], [64]]
        assert [s["contexts"] for s in condition["decode"]] == [[64], [64] * 4]
        assert all(s["s"] > 0 for kind in ("prefill", "decode") for s in condition[kind])
    assert "beside prefill" in out.stderr and "1  busy    prefill beside prefill" in out.stdout
    assert "--add-contention" in profile.source
    assert one.prefill == before.degree(1).prefill  # the rest of the profile is kept
    assert not _load_processes()  # the busy processes were stopped
