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
import sys

from decode_ab import add_step_options, alternate, pin


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
    add_step_options(p, "1x256,8x256,32x256,64x256,32x1024,64x1024")
    p.add_argument("--python-only", action="store_true",
                   help="time the layer-by-layer step with its kernels returning at once, beside the real "
                        "one")
    args = p.parse_args()
    shapes = pin(args)
    from splitserve.engine import EngineConfig, LLMEngine
    from splitserve.engine.ops import CpuKernelOps

    engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
    ops = engine.runner.model.ops
    if not isinstance(ops, CpuKernelOps):
        sys.exit("the compiled kernels do not run on this CPU")
    if args.python_only:
        ops.fused_decode = False
        kernels, no_compute = ops.k, NoCompute(ops.k)
        setups = {"layer by layer": lambda: setattr(ops, "k", kernels),
                  "its Python alone": lambda: setattr(ops, "k", no_compute)}
    else:
        setups = {"layer by layer": lambda: setattr(ops, "fused_decode", False),
                  "one call": lambda: setattr(ops, "fused_decode", True)}
    alternate(engine, shapes, args, setups)

if __name__ == "__main__":
    main()
