import argparse, sys
sys.path.insert(0, "scripts")
from decode_ab import add_step_options, alternate, pin
p = argparse.ArgumentParser(); add_step_options(p, "32x1024,64x1024,8x1024"); args = p.parse_args()
shapes = pin(args)
from splitserve.engine import EngineConfig, LLMEngine
engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
k = engine.runner.model.ops.k
def setup(mode, n):
    def f():
        k.set_attention_prefetch(mode); k.set_pf_tokens(n)
    return f
alternate(engine, shapes, args, {"l2": setup("l2", 128), "lines16": setup("l2-lines", 16), "lines32": setup("l2-lines", 32), "lines64": setup("l2-lines", 64)})
