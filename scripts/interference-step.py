"""What a little CPU taken by other processes costs a two-thread decode step, and whether their
scheduling priority changes it: the engine on cores 0-1 with two threads stepping alone, and beside
--procs small processes that each wake every --period-ms and spin for --burst-ms (as the gateway,
scheduler, Redis and a load generator wake on a cluster's two cores), under each setup in turn:

- none: no such processes;
- own-group: each in a session of its own, so in an autogroup of its own (as `splitserve up` starts
  its services), nice 0;
- own-group-nice19: the same, its autogroup at nice 19 (/proc/self/autogroup);
- same-group: in this process's session, nice 0;
- same-group-nice19: the same at nice 19;
- same-group-idle: the same under SCHED_IDLE (it runs only when a core has nothing else to run).

    .venv/bin/python scripts/interference-step.py --shapes 1x128,8x128,32x128 --rounds 3

Each round times --steps decode steps per shape and setup (`bench engine`'s step: the runner's decode
and the greedy argmax); at the end it prints each round's median per shape and setup, with the share
of a core the small processes got meanwhile (from /proc). docs/benchmarks.md, "In-worker step
time", says what it showed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from decode_ab import parse_shapes

SETUPS = ("none", "own-group", "own-group-nice19", "same-group", "same-group-nice19", "same-group-idle")

# One small process: its priority as the setup says, then wake every period and spin for burst.
SPIN = r"""
import os, sys, time
setup, period, burst = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if setup == "own-group-nice19":
    with open("/proc/self/autogroup", "w") as f:
        f.write("19")
elif setup == "same-group-nice19":
    os.nice(19)
elif setup == "same-group-idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True:
    time.sleep(period)
    start = time.perf_counter()
    while time.perf_counter() - start < burst:
        pass
"""


def start(setup: str, args: argparse.Namespace) -> list[subprocess.Popen]:
    if setup == "none":
        return []
    argv = [sys.executable, "-c", SPIN, setup, str(args.period_ms / 1e3), str(args.burst_ms / 1e3)]
    own_session = setup.startswith("own-group")
    return [subprocess.Popen(argv, start_new_session=own_session) for _ in range(args.procs)]


def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    total = 0
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x128,8x128,32x128", help="batch x context (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every shape and setup (default: 3)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per shape and setup (default: 40)")
    p.add_argument("--procs", type=int, default=4, help="small processes (default: 4)")
    p.add_argument("--period-ms", type=float, default=2.0, help="each sleeps this long (default: 2)")
    p.add_argument("--burst-ms", type=float, default=0.1, help="then spins this long (default: 0.1)")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated (default: all)")
    args = p.parse_args()
    setups = args.setups.split(",")
    if unknown := set(setups) - set(SETUPS):
        p.error(f"unknown setups {sorted(unknown)}: choose from {', '.join(SETUPS)}")
    os.sched_setaffinity(0, [0, 1])
    import torch

    torch.set_num_threads(2)
    from splitserve.bench.engine_bench import decode_batch
    from splitserve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=2 << 30, max_num_seqs=128))
    runner = engine.runner
    shapes = parse_shapes(args.shapes)
    medians = {(shape, s): [] for shape in shapes for s in setups}
    shares = {(shape, s): [] for shape in shapes for s in setups}
    for r in range(args.rounds):
        for shape in shapes:
            seqs, tables = decode_batch(engine, *shape)
            for setup in setups if r % 2 == 0 else setups[::-1]:
                procs = start(setup, args)
                try:
                    time.sleep(0.3)
                    if any(proc.poll() is not None for proc in procs):
                        raise SystemExit(f"a small process of setup {setup} exited (exit {procs[0].poll()})")
                    cpu0, wall0 = cpu_seconds(procs), time.perf_counter()
                    steps = []
                    for _ in range(args.steps):
                        begin = time.perf_counter()
                        runner.greedy(runner.decode(seqs, tables)).tolist()
                        steps.append((time.perf_counter() - begin) * 1e3)
                    share = (cpu_seconds(procs) - cpu0) / (time.perf_counter() - wall0)
                finally:
                    for proc in procs:
                        proc.kill()
                        proc.wait()
                medians[(shape, setup)].append(round(statistics.median(steps), 1))
                shares[(shape, setup)].append(round(share, 2))
            for s in seqs:
                engine.blocks.free(s.request_id)
        print(f"round {r + 1} done", flush=True)
    for batch, context in shapes:
        print(f"{batch} x {context}: median step ms per round (share of a core the small processes got)")
        for setup in setups:
            print(f"  {setup}: {medians[((batch, context), setup)]} ({shares[((batch, context), setup)]})")


if __name__ == "__main__":
    main()
