"""The decode step pipelined (the attention of one half of the batch beside the GEMMs of the other,
DecodeLayers::run_pipelined) against the same step run layer by layer, kernel by kernel, alternated
in one engine, so that the VM's drift between runs falls on both alike:

    .venv/bin/python scripts/decode-pipeline-ab.py --shapes 16x1024,32x512,64x256,32x1024,64x1024 --rounds 4

Times `bench engine`'s decode step (`bench_decode`: the best of --steps steps) at each batch x context
with the pipeline on and off (set_decode_pipeline), in turn, on cores 0-1 with two threads. Shapes below
the pipeline's thresholds (16 sequences, K and V of 1.75x the layers' weights: 16,128 tokens of context
for the default model) run layer by layer either way.
Each round starts with a memory-read probe (GB/s), to tell the VM's hour. docs/benchmarks.md, "The
attention beside the GEMMs".
"""

from __future__ import annotations

import argparse
import sys

from decode_ab import add_step_options, alternate, pin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(p, "16x1024,32x512,64x256,32x1024,64x1024")
    args = p.parse_args()
    shapes = pin(args)
    from splitserve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
    kernels = getattr(engine.runner.model.ops, "k", None)
    if kernels is None:
        sys.exit("the compiled kernels do not run on this CPU")

    def pipeline(on: bool):
        return lambda: kernels.set_decode_pipeline(on)

    alternate(engine, shapes, args, {"pipelined": pipeline(True), "layer by layer": pipeline(False)})
    kernels.set_decode_pipeline(True)


if __name__ == "__main__":
    main()
