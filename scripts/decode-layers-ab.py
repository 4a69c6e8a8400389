"""The engine's decode step with every layer in one kernel call (DecodeLayers) against layer by
layer in Python on the same kernels, alternated in one process, so that the VM's drift between
runs falls on both alike.

    .venv/bin/python scripts/decode-layers-ab.py --shapes 1x256,8x256,32x256,64x256,32x1024 --rounds 4

Loads one engine (the default model) and times `bench engine`'s decode step (`bench_decode`: the
best of --steps steps) at each batch x context with CpuKernelOps.fused_decode off and on, in turn,
on cores 0-1 with two threads (or core 0 with one: --threads 1). Each round starts with a
memory-read probe (GB/s), to tell the VM's hour (docs/benchmarks.md, "A decode step's layers in one
call").

With --python-only it times instead the layer-by-layer step with every kernel the layers call
replaced by one that returns a tensor of the right shape at once, beside the real step: what the
Python between the kernels costs (the embedding, the LM head's argmax and the inputs' tensors are in
both).

    .venv/bin/python scripts/decode-layers-ab.py --python-only --shapes 1x256,8x256,32x256 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time


class NoCompute:
    """The kernels the layers call, each returning a (cached) tensor of its output's shape at once;
    everything else is the real module's."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels
        self.outputs: dict[tuple[int, ...], object] = {}

    def _out(self, *shape: int):
        import torch

        if shape not in self.outputs:
            self.outputs[shape] = torch.zeros(shape, dtype=torch.bfloat16)
        return self.outputs[shape]

    def gemm(self, x, packed, n, bias):
        return self._out(x.shape[0], n)

    def add_rmsnorm(self, residual, delta, weight, eps):
        return self._out(*residual.shape)

    def rope_write_kv(self, *args) -> None:
        return None

    def decode_attention(self, q, *args):
        return self._out(*q.shape)

    def silu_mul(self, gate_up):
        return self._out(gate_up.shape[0], gate_up.shape[1] // 2)

    def __getattr__(self, name: str):
        return getattr(self.kernels, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x256,8x256,32x256,64x256,32x1024,64x1024",
                   help="batch x context, comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of every shape (default: 4)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape, the best kept (default: 8)")
    p.add_argument("--threads", type=int, choices=(1, 2), default=2,
                   help="torch threads, pinned to cores 0-1 or (one) to core 0 (default: 2)")
    p.add_argument("--python-only", action="store_true",
                   help="time the layer-by-layer step with its kernels returning at once, beside the real "
                        "one")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    os.sched_setaffinity(0, [0, 1] if args.threads == 2 else [0])
    import torch

    from splitserve.bench.engine_bench import bench_decode
    from splitserve.engine import EngineConfig, LLMEngine
    from splitserve.engine.ops import CpuKernelOps

    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
    ops = engine.runner.model.ops
    if not isinstance(ops, CpuKernelOps):
        sys.exit("the compiled kernels do not run on this CPU")
    names = {False: "layer by layer", True: "one call"}
    kernels = ops.k
    if args.python_only:
        names = {False: "layer by layer", True: "its Python alone"}
        ops.fused_decode = False
        no_compute = NoCompute(kernels)
    times: dict[tuple[int, int], dict[bool, list[float]]] = {shape: {False: [], True: []} for shape in shapes}
    probe = torch.ones(256 << 20)
    for r in range(args.rounds):
        probe.sum()
        start = time.perf_counter()
        probe.sum()
        print(f"round {r + 1}: memory read {(1 << 30) / (time.perf_counter() - start) / 1e9:.0f} GB/s", flush=True)
        for shape in shapes:
            for second in (False, True) if r % 2 == 0 else (True, False):
                if args.python_only:
                    ops.k = no_compute if second else kernels
                else:
                    ops.fused_decode = second
                times[shape][second].append(round(bench_decode(engine, *shape, args.steps) * 1e3, 2))
    for (batch, context), runs in times.items():
        print(f"{batch} x {context}: step ms, " + ", ".join(f"{names[f]} {runs[f]}" for f in (False, True)))


if __name__ == "__main__":
    main()
