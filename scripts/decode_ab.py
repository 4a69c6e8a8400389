"""What the decode-step A/B scripts share (decode-step-ab.py, decode-layers-ab.py): their options,
the pinning, and the rounds that time `bench engine`'s decode step (`bench_decode`: the best of
--steps steps) under two setups in turn, each round opened by a memory-read probe (GB/s) that tells
the VM's hour."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable


def add_step_options(p: argparse.ArgumentParser, shapes: str) -> None:
    """--shapes (default: shapes), --rounds, --steps and --threads."""
    p.add_argument("--shapes", default=shapes, help="batch x context, comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of every shape (default: 4)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape, the best kept (default: 8)")
    p.add_argument("--threads", type=int, choices=(1, 2), default=2,
                   help="torch threads, pinned to cores 0-1 or (one) to core 0 (default: 2)")


def pin(args: argparse.Namespace) -> list[tuple[int, int]]:
    """Pin the process as --threads says, set torch's threads to match, and return the shapes."""
    os.sched_setaffinity(0, [0, 1] if args.threads == 2 else [0])
    import torch

    torch.set_num_threads(args.threads)
    return parse_shapes(args.shapes)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x256,8x1024" -> [(1, 256), (8, 1024)] (batch, context)."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def read_rate_gbps(probe) -> float:
    """GB/s of a second read of probe (a 1 GiB float32 tensor): the VM's memory speed this minute."""
    probe.sum()
    start = time.perf_counter()
    probe.sum()
    return probe.numel() * 4 / (time.perf_counter() - start) / 1e9


def alternate(engine, shapes: list[tuple[int, int]], args: argparse.Namespace,
              setups: dict[str, Callable[[], None]]) -> None:
    """Each round, each shape's step under both setups (in turn, the order reversed every other
    round); then print every shape's step times in ms per setup."""
    import torch

    from splitserve.bench.engine_bench import bench_decode

    names = list(setups)
    times = {shape: {name: [] for name in names} for shape in shapes}
    probe = torch.ones(256 << 20)
    for r in range(args.rounds):
        print(f"round {r + 1}: memory read {read_rate_gbps(probe):.0f} GB/s", flush=True)
        for shape in shapes:
            for name in names if r % 2 == 0 else names[::-1]:
                setups[name]()
                times[shape][name].append(round(bench_decode(engine, *shape, args.steps) * 1e3, 2))
    for (batch, context), runs in times.items():
        print(f"{batch} x {context}: step ms, " + ", ".join(f"{name} {runs[name]}" for name in names))
