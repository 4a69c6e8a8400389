"""One parallelism degree's step-time samples, measured in a fresh process placed like a worker.

    python -m splitserve.planner.measure --cpus 0,1 --threads 2 [--quick] [--repeat 3]
    python -m splitserve.planner.measure --cpus 1 --threads 1 --load decode      # steps until killed
    python -m splitserve.planner.measure --cpus 0 --threads 1 --contention --beside prefill=PID --beside decode=PID

`splitserve profile` starts one of these per core count: the process pins itself (--cpus) and sets
its torch threads before the engine loads, as `splitserve up` places a worker. It times the model
runner's forward passes (what an engine step costs, without the server around it) over prefill
batches, decode batches and chunked-prefill mixed steps, and prints one JSON document on stdout:
the samples in the layouts of `latency.py`, and the model's KV size. Each time is the median of
--repeat runs after a warm-up run.

`--contention` times a few prefill and decode shapes alone and beside busy cores, to see how much a
step slows down when its neighbours work (they share the memory system and the last-level cache).
The neighbours are `--load` processes on the other cores that `splitserve profile` started: each
prints "ready" once its model is loaded, then runs steps of one kind back to back. This process
pauses and resumes them (SIGSTOP, SIGCONT) so that every round times each shape alone and beside
each kind of load in turn: the VM's drift, which is as large as the effect, falls on all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, replace

from splitserve.common.engine_args import DTYPE_NAMES, apply_threads, cpu_list, positive_int
from splitserve.common.logging import configure_logging
from splitserve.common.proc import die_with_parent

# A mixed step: chunks as (prefix, n) pairs, plus `batch` decodes at `context` tokens each.
MixedShape = tuple[tuple[tuple[int, int], ...], int, int]


@dataclass(frozen=True)
class Shapes:
    prefill: tuple[tuple[int, ...], ...]  # each a batch of prompt lengths
    decode: tuple[tuple[int, ...], ...]  # each a batch of context lengths
    mixed: tuple[MixedShape, ...]

    @property
    def max_tokens_held(self) -> int:
        prefill = max((sum(b) for b in self.prefill), default=0)
        decode = max((sum(b) for b in self.decode), default=0)
        mixed = max(sum(p + n for p, n in c) + b * ctx for c, b, ctx in self.mixed) if self.mixed else 0
        return max(prefill, decode, mixed)


def _full() -> Shapes:
    # sum(len) and sum(len^2) vary independently: the same tokens as one prompt or as many.
    uniform = [(n,) * k for n in (16, 64, 128, 256, 512, 1024, 2048) for k in (1, 2, 4, 8, 16, 32)
               if n * k <= 2048]
    mixes = [(1024,) + (64,) * 8, (512,) + (32,) * 16, (1536, 256, 256), (768,) + (128,) * 6]
    decode = [(c,) * b for c in (64, 256, 512, 1024, 2048) for b in (1, 2, 4, 8, 16, 32, 64) if b * c <= 65536]
    decode += [(64,) * 8 + (1024,) * 8, (128,) * 31 + (2048,)]
    mixed = [(((p, 256 - b),), b, 256) for b in (0, 8, 32) for p in (0, 512, 1024)]
    mixed += [(((0, 128),), 16, 1024), (((0, 64), (0, 64)), 0, 256), ((), 16, 256)]
    return Shapes(tuple(uniform + mixes), tuple(decode), tuple(mixed))


QUICK = Shapes(
    prefill=((16,), (64,), (16,) * 4, (64,) * 4, (64, 16, 16)),
    decode=((64,), (64,) * 4, (128,), (128,) * 4, (64, 128)),
    mixed=((((0, 32),), 0, 64), (((32, 32),), 2, 64), (((0, 16),), 4, 128), (((64, 64),), 0, 64)),
)
FULL = _full()
# The shapes whose slowdown beside busy cores `profile` measures: prompts and decode batches the size
# of the planner's workloads.
CONTENTION = Shapes(
    prefill=((64,), (256,), (1024,), (256,) * 4),
    decode=((256,), (512,) * 8, (512,) * 32),
    mixed=(),
)
QUICK_CONTENTION = Shapes(prefill=((16,), (64,)), decode=((64,), (64,) * 4), mixed=())
# What a --load process runs back to back: a chatbot-sized prompt, or a batch of decodes.
LOAD_SHAPES = {"prefill": (512,), "decode": (512,) * 16}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=cpu_list, default=None, help="pin to these cores")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: one per core)")
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument("--contention", action="store_true",
                        help="time a few shapes alone and beside the --beside processes (paused in turn)")
    shapes.add_argument("--load", choices=sorted(LOAD_SHAPES),
                        help="no measuring: run these steps back to back until terminated")
    p.add_argument("--quick", action="store_true", help="a few tiny shapes (a smoke run)")
    p.add_argument("--beside", type=_load_pids, action="append", default=[], metavar="KIND=PID[,PID]",
                   help="with --contention: the --load processes running KIND steps on the other cores")
    p.add_argument("--repeat", type=positive_int, default=3, help="timed runs per shape (default: 3)")
    p.add_argument("--model", default=None, help="as every engine command's --model (default: the bundled one)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=positive_int, default=16)


def _load_pids(text: str) -> tuple[str, list[int]]:
    kind, _, pids = text.partition("=")
    try:
        if kind not in LOAD_SHAPES:
            raise ValueError
        return kind, [int(pid) for pid in pids.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KIND=PID[,PID...] with KIND prefill or decode, got {text!r}") from None


class Runner:
    """The engine's model runner over a KV cache big enough for the largest shape."""

    def __init__(self, args: argparse.Namespace, shapes: Shapes) -> None:
        from splitserve.engine import EngineConfig, LLMEngine, LoadedModel
        from splitserve.engine.kv_cache import KVLayout

        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size)
        loaded = LoadedModel.load(config)
        spec = loaded.spec
        layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, config.block_size, config.torch_dtype)
        kv_bytes = (shapes.max_tokens_held + 256 * config.block_size) * layout.bytes_per_token
        self.engine = LLMEngine(replace(config, kv_cache_bytes=kv_bytes), loaded=loaded)
        self.repeat = args.repeat
        self.rng = random.Random(0)
        self._ids = 0

    def _seq(self, num_prompt: int, num_output: int = 0):
        from splitserve.engine import SamplingParams, Sequence

        self._ids += 1
        vocab = self.engine.loaded.spec.vocab_size
        ids = [self.rng.randrange(3, vocab) for _ in range(num_prompt)]
        return Sequence(f"profile-{self._ids}", ids, SamplingParams(temperature=0.0),
                        output_token_ids=[5] * num_output)

    def _time(self, fn) -> float:
        fn()  # warm-up
        return statistics.median(self._once(fn) for _ in range(self.repeat))

    def _once(self, fn) -> float:
        import torch

        start = time.perf_counter()
        fn()
        if self.engine.runner.device.type == "cuda":
            torch.cuda.synchronize(self.engine.runner.device)
        return time.perf_counter() - start

    def _tables(self, seqs, num_tokens: list[int]) -> list[list[int]]:
        return [self.engine.blocks.allocate(s.request_id, n) for s, n in zip(seqs, num_tokens)]

    def _free(self, seqs) -> None:
        for s in seqs:
            self.engine.blocks.free(s.request_id)

    def prefill(self, lens: tuple[int, ...]) -> dict:
        seqs = [self._seq(n) for n in lens]
        tables = self._tables(seqs, list(lens))
        try:
            runner = self.engine.runner
            seconds = self._time(lambda: runner.greedy(runner.prefill(seqs, tables)))
        finally:
            self._free(seqs)
        return {"lens": list(lens), "s": seconds}

    def _decodes(self, contexts: tuple[int, ...]):
        """Sequences whose next decode step runs at these contexts (each step rewrites the last slot)."""
        seqs = [self._seq(c - 1, 1) for c in contexts]
        for s in seqs:
            s.num_computed_tokens = s.num_tokens - 1
        return seqs, self._tables(seqs, list(contexts))

    def decode(self, contexts: tuple[int, ...]) -> dict:
        seqs, tables = self._decodes(contexts)
        try:
            runner = self.engine.runner
            seconds = self._time(lambda: runner.greedy(runner.decode(seqs, tables)).tolist())
        finally:
            self._free(seqs)
        return {"contexts": list(contexts), "s": seconds}

    def mixed(self, shape: MixedShape) -> dict:
        chunk_shape, batch, context = shape
        decodes, decode_tables = self._decodes((context,) * batch)
        chunk_seqs = [self._seq(p + n) for p, n in chunk_shape]
        for seq, (p, _) in zip(chunk_seqs, chunk_shape):
            seq.num_computed_tokens = p
        chunk_tables = self._tables(chunk_seqs, [p + n for p, n in chunk_shape])
        chunks = [(seq, n) for seq, (_, n) in zip(chunk_seqs, chunk_shape)]
        try:
            runner = self.engine.runner
            seconds = self._time(
                lambda: runner.greedy(runner.mixed(chunks, decodes, chunk_tables, decode_tables)))
        finally:
            self._free(decodes + chunk_seqs)
        return {"chunks": [list(c) for c in chunk_shape], "contexts": [context] * batch, "s": seconds}


def _shapes(args: argparse.Namespace) -> Shapes:
    if args.load == "prefill":
        return Shapes(prefill=(LOAD_SHAPES["prefill"],), decode=(), mixed=())
    if args.load == "decode":
        return Shapes(prefill=(), decode=(LOAD_SHAPES["decode"],), mixed=())
    if args.contention:
        return QUICK_CONTENTION if args.quick else CONTENTION
    return QUICK if args.quick else FULL


PAUSE_SETTLE_S = 0.05  # after pausing or resuming the loads, before timing


class Neighbours:
    """The --load processes on the other cores, paused or resumed as one kind at a time."""

    def __init__(self, beside: list[tuple[str, list[int]]]) -> None:
        self.pids = dict(beside)
        if len(self.pids) != len(beside) or sorted(self.pids) != sorted(LOAD_SHAPES):
            raise ValueError("--contention needs --beside prefill=... and --beside decode=..., once each")

    def only(self, kind: str | None) -> None:
        """Resume the loads of this kind (None: no load), pause the others."""
        for k, pids in self.pids.items():
            for pid in pids:
                os.kill(pid, signal.SIGCONT if k == kind else signal.SIGSTOP)
        time.sleep(PAUSE_SETTLE_S)


def contention(args: argparse.Namespace, runner: Runner) -> dict:
    """Per condition ("alone", "beside prefill", "beside decode"), the contention shapes' samples."""
    neighbours = Neighbours(args.beside)
    conditions = {"alone": None, **{f"beside {kind}": kind for kind in sorted(LOAD_SHAPES)}}
    samples = {name: {"prefill": [], "decode": []} for name in conditions}

    def interleaved(fn) -> dict:
        fn()  # warm-up
        times = {name: [] for name in conditions}
        for _ in range(runner.repeat):
            for name, kind in conditions.items():
                neighbours.only(kind)
                times[name].append(runner._once(fn))
        return {name: statistics.median(t) for name, t in times.items()}

    runner._time = interleaved  # every shape method now times its step under each condition in turn
    shapes = _shapes(args)
    try:
        for kind, kind_shapes in (("prefill", shapes.prefill), ("decode", shapes.decode)):
            for shape in kind_shapes:
                sample = getattr(runner, kind)(shape)
                for name, seconds in sample.pop("s").items():
                    samples[name][kind].append({**sample, "s": seconds})
                print(f"{kind} {_short(shape)}: " + ", ".join(
                    f"{name} {samples[name][kind][-1]['s'] * 1e3:.1f} ms" for name in conditions),
                    file=sys.stderr, flush=True)
    finally:
        neighbours.only(None)
    return samples


def _short(shape) -> str:
    return str(shape) if len(str(shape)) < 60 else str(shape)[:57] + "..."


def load(args: argparse.Namespace) -> None:
    """Step back to back until terminated (SIGTERM ends the process: nothing to clean up), or until
    the process that started this one is gone."""
    parent = os.getppid()
    die_with_parent(parent)  # even while paused (SIGSTOP) by the measuring process
    apply_threads(args)
    runner = Runner(argparse.Namespace(**{**vars(args), "repeat": 1}), _shapes(args))
    step = getattr(runner, args.load)
    print("ready", flush=True)
    while os.getppid() == parent:
        step(LOAD_SHAPES[args.load])
    sys.exit(0)


def measure(args: argparse.Namespace) -> dict:
    import torch

    apply_threads(args)
    shapes = _shapes(args)
    runner = Runner(args, shapes)
    if args.contention:
        return {"threads": torch.get_num_threads(), "cpus": args.cpus, "contention": contention(args, runner)}
    samples = {"prefill": [], "decode": [], "mixed": []}
    for kind, shape_list in (("prefill", shapes.prefill), ("decode", shapes.decode), ("mixed", shapes.mixed)):
        for shape in shape_list:
            samples[kind].append(getattr(runner, kind)(shape))
            print(f"{kind} {_short(shape)}: {samples[kind][-1]['s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    engine = runner.engine
    return {"model": {"name": engine.loaded.source.name, "dtype": args.dtype,
                      "kv_bytes_per_token": engine.layout.bytes_per_token, "max_model_len": engine.max_model_len,
                      "num_layers": engine.loaded.spec.num_layers},
            "threads": torch.get_num_threads(), "cpus": args.cpus, "torch": torch.__version__,
            "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitserve.planner.measure", description=__doc__)
    add_args(parser)
    configure_logging("warning")  # logs go to stderr; stdout carries the one JSON document
    args = parser.parse_args(argv)
    if args.load:
        load(args)
    print(json.dumps(measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
