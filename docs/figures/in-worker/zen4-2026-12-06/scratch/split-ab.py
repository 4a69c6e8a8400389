# Scratch (not kept), as run for docs/benchmarks.md ("In-worker step time", Zen 4): from a copy of the
# tree with batch-split.diff applied, from its root with PYTHONPATH=$PWD; scripts/ is that tree's.
import argparse, sys
sys.path.insert(0, "scripts")
from decode_ab import add_step_options, alternate, pin
p = argparse.ArgumentParser(); add_step_options(p, "32x1024,64x1024,32x256,64x256,16x1024")
p.add_argument("--cost", type=float, default=768)
args = p.parse_args(); shapes = pin(args)
import torch
from splitserve.engine import EngineConfig, LLMEngine
from splitserve.engine import kernels
eng = LLMEngine(EngineConfig(kv_cache_bytes=4 << 30, max_num_seqs=128))
from splitserve.engine.kernels import load_cpu_kernels
mod = load_cpu_kernels()
print("module", mod)
alternate(eng, shapes, args, {"rows together": lambda: mod.set_decode_split(0, args.cost),
                               "rows split": lambda: mod.set_decode_split(4, args.cost)})
