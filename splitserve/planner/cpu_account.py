"""The CPU each process of a local cluster used while a command ran: what `calibrate --loaded` reads.

    python -m splitserve.planner.cpu_account --root UP_PID --output cpu.json -- \
        splitserve bench serve --url http://127.0.0.1:8000 ... --output run.json

It reads the user + system CPU seconds of every process under --root (the `splitserve up` process)
from /proc before and after the command, names each by its role (gateway, scheduler, prefill,
decode, colocated, redis), adds the command's own CPU (the load generator) and the machine's busy
CPU seconds (/proc/stat), and writes one JSON document. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROLES = ("gateway", "scheduler", "prefill", "decode", "colocated", "redis")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _role(cmdline: list[str]) -> str:
    if any("redis-server" in arg for arg in cmdline):
        return "redis"
    return next((arg for arg in cmdline if arg in ROLES), "other")


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of root and its descendants."""
    procs: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_text().split("\0")
        except OSError:
            continue  # it ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry)] = (int(fields[1]), _role(cmdline), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            tree[pid] = procs[pid][1:]
            todo += [child for child, (parent, _, _) in procs.items() if parent == pid]
    return tree


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (user + nice + system + irq + softirq + steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / CLOCK_TICKS


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def account(root: int, command: list[str]) -> dict:
    before, busy_before, start = tree_cpu(root), machine_busy_s(), time.monotonic()
    if not before:
        raise ValueError(f"no process {root}")
    children_before = _children_cpu_s()  # of this process's earlier children, if any
    code = subprocess.run(command, check=False).returncode
    wall, after, busy = time.monotonic() - start, tree_cpu(root), machine_busy_s() - busy_before
    client = _children_cpu_s() - children_before
    per_role: dict[str, float] = defaultdict(float)
    for pid, (role, cpu) in after.items():
        per_role[role] += cpu - (before[pid][1] if pid in before else 0.0)
    return {"command": command, "exit_code": code, "wall_s": round(wall, 2),
            "processes_cpu_s": {k: round(v, 2) for k, v in sorted(per_role.items())},
            "client_cpu_s": round(client, 2), "machine_busy_cpu_s": round(busy, 1),
            "others_cpu_s": round(busy - sum(per_role.values()) - client, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitserve.planner.cpu_account", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=int, required=True, help="the PID of `splitserve up`")
    p.add_argument("--output", type=Path, required=True, help="the JSON document to write")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run (the load generator)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    result = account(args.root, command)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["processes_cpu_s"]), f"client {result['client_cpu_s']} s, wall {result['wall_s']} s",
          file=sys.stderr)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
