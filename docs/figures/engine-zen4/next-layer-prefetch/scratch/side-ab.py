"""The next layer's K/V prefetched during the GEMMs, off against on (16 and 24 MB), alternated in one engine."""
from __future__ import annotations
import argparse, os, sys
sys.path.insert(0, "scripts")  # run from the repository root, with the diff applied
from decode_ab import add_step_options, alternate, pin

def main() -> None:
    p = argparse.ArgumentParser()
    add_step_options(p, "32x1024,64x1024,64x256,32x256,16x1024")
    args = p.parse_args()
    shapes = pin(args)
    from splitserve.engine import EngineConfig, LLMEngine
    from splitserve.engine.kernels import load_cpu_kernels
    k = load_cpu_kernels()
    engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
    print("default next-layer prefetch:", k.next_layer_prefetch(), "attention prefetch:", k.attention_prefetch())
    def use(n):
        return lambda: k.set_next_layer_prefetch(n)
    sizes = [int(x) for x in os.environ.get("SIDE_MB", "16,24").split(",")]
    alternate(engine, shapes, args, {"off": use(0), **{f"{mb} MB": use(mb << 20) for mb in sizes}})

if __name__ == "__main__":
    main()
