"""The engine's decode step with this tree's kernels against another revision's, alternated in one
process, so that the VM's drift between runs (10-20%, more between its slow and fast hours) falls
on both alike.

    .venv/bin/python scripts/decode-step-ab.py --baseline b1658ca --shapes 32x256,64x256,32x1024 --rounds 4
    .venv/bin/python scripts/decode-step-ab.py --baseline b1658ca --threads 1 --shapes 16x192,32x128

Builds splitserve/engine/kernels/cpu_bf16.cpp as it was at the baseline revision (git show) beside
this tree's, loads one engine (the default model), and times `bench engine`'s decode step
(`bench_decode`: the best of --steps steps) at each batch x context with either module as the
engine's kernels, in turn, on cores 0-1 with two threads (or core 0 with one: --threads 1). Each
round starts with a memory-read probe (GB/s), to tell the VM's hour. The step computes over the
cache as it is, so two revisions that lay the cache out differently are timed alike; both must pack
weights the same way (checked). docs/benchmarks.md, "KV blocks in a tiled layout".
"""

from __future__ import annotations

import argparse
import sys

from decode_ab import add_step_options, alternate, pin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the git revision whose kernels to compare against")
    add_step_options(p, "32x256,64x256,32x1024,64x1024,8x1024")
    args = p.parse_args()
    shapes = pin(args)
    import torch
    from kernels_at import load_kernels_at

    from splitserve.engine import EngineConfig, LLMEngine
    from splitserve.engine.kernels import load_cpu_kernels

    new = load_cpu_kernels()
    if new is None:
        sys.exit("the compiled kernels do not run on this CPU")
    old = load_kernels_at(args.baseline, "decode_step_baseline")
    if new.amx_enabled() and not old.amx_enable():
        sys.exit("this tree's kernels run on AMX and the baseline's could not")
    weight = torch.randn(200, 576, dtype=torch.bfloat16)
    if not torch.equal(old.pack_weight(weight), new.pack_weight(weight)):
        sys.exit("the two revisions pack weights differently: one engine cannot run both")

    engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
    ops = engine.runner.model.ops

    def use(module):
        def setup() -> None:
            ops.use_kernels(module)  # not ops.k = module: the other's DecodeLayers would keep running
        return setup

    alternate(engine, shapes, args, {"baseline": use(old), "this tree": use(new)})

if __name__ == "__main__":
    main()
