"""splitserve.planner.cpu_account: the CPU a local cluster's processes used while a command ran."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from splitserve.planner import cpu_account

BURN = ("import sys, time\nend = time.process_time() + float(sys.argv[1])\nwhile time.process_time() < end: pass\n"
        "time.sleep(float(sys.argv[2]))\n")


def test_it_counts_each_role_s_cpu_during_the_command_and_the_command_s_own(tmp_path):
    # A stand-in for `splitserve up`: its "decode" child burns 0.6 s of CPU, then idles (a process that
    # has exited by the end is not counted: the cluster's processes outlive the command).
    script = tmp_path / "burn.py"
    script.write_text(BURN)
    up = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, {str(script)!r}, '0.6', '30', 'decode'])\n"
        "child.wait()\n")])
    try:
        time.sleep(0.3)
        out = tmp_path / "cpu.json"
        code = cpu_account.main(["--root", str(up.pid), "--output", str(out), "--",
                                 sys.executable, str(script), "0.4", "1.0"])  # then waits for the child to finish
        assert code == 0
        result = json.loads(out.read_text())
        assert 0.25 <= result["processes_cpu_s"]["decode"] <= 0.65  # what it burned after the first snapshot
        assert 0.35 <= result["client_cpu_s"] <= 1.0  # the command's 0.4 s and its interpreter's start
        assert result["wall_s"] >= 1.4 and result["machine_busy_cpu_s"] >= 0.7
    finally:
        for pid in cpu_account.tree_cpu(up.pid):
            subprocess.run(["kill", str(pid)], check=False)
        up.wait()
