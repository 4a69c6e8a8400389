# Scratch (not kept), as run for docs/benchmarks.md ("In-worker step time", Zen 4): from a copy of the
# tree with batch-split.diff applied, from its root with PYTHONPATH=$PWD; scripts/ is that tree's.
"""scratch: rows split vs together, alone and beside the small processes (own autogroup, nice 0)."""
import argparse, os, statistics, sys, time
sys.path.insert(0, os.path.dirname(__file__))
import importlib
isp = importlib.import_module("interference-step")
from decode_ab import parse_shapes
p = argparse.ArgumentParser()
p.add_argument("--shapes", default="16x128,32x128,64x128,32x1024")
p.add_argument("--rounds", type=int, default=3); p.add_argument("--steps", type=int, default=30)
p.add_argument("--procs", type=int, default=4); p.add_argument("--period-ms", type=float, default=2.0); p.add_argument("--burst-ms", type=float, default=0.1)
args = p.parse_args()  # run from a tree with batch-split.diff applied (set_decode_split)
os.sched_setaffinity(0, [0, 1])
import torch; torch.set_num_threads(2)
from splitserve.bench.engine_bench import decode_batch
from splitserve.engine import EngineConfig, LLMEngine
from splitserve.engine.kernels import load_cpu_kernels
eng = LLMEngine(EngineConfig(kv_cache_bytes=4 << 30, max_num_seqs=128)); r = eng.runner
mod = load_cpu_kernels()
combos = [(split, setup) for split in (0, 4) for setup in ("none", "own-group")]
res = {}
for rnd in range(args.rounds):
    for shape in parse_shapes(args.shapes):
        seqs, tables = decode_batch(eng, *shape)
        for split, setup in (combos if rnd % 2 == 0 else combos[::-1]):
            mod.set_decode_split(split, 768)
            procs = isp.start(setup, args)
            try:
                time.sleep(0.3); c0, w0 = isp.cpu_seconds(procs), time.perf_counter(); ts = []
                for _ in range(args.steps):
                    a = time.perf_counter(); r.greedy(r.decode(seqs, tables)).tolist(); ts.append((time.perf_counter() - a) * 1e3)
                share = (isp.cpu_seconds(procs) - c0) / (time.perf_counter() - w0)
            finally:
                for q in procs: q.kill(); q.wait()
            res.setdefault((shape, split, setup), []).append((round(statistics.median(ts), 1), round(share, 2)))
        for q in seqs: eng.blocks.free(q.request_id)
    print("round", rnd + 1, flush=True)
for k, v in res.items(): print(k, v)
