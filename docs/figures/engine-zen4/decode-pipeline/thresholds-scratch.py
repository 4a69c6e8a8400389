# Scratch (2026-12-07): needs a build of the kernels with temporary setters that were not kept:
# set_lead(lines a K step, KB ahead) and set_thr(sequences, mean context). Output: thresholds.txt.
#   .venv/bin/python thresholds-scratch.py 32x256,64x256 ROUNDS
import os, sys, torch
os.sched_setaffinity(0, [0, 1]); torch.set_num_threads(2)
from splitserve.engine import EngineConfig, LLMEngine
from splitserve.bench.engine_bench import bench_decode
engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
k = engine.runner.model.ops.k
def s(on, lines=3, kb=512):
    return lambda: (k.set_decode_pipeline(on), k.set_lead(lines, kb))
k.set_thr(8, 64)
settings = {"off": s(False), "2/512": s(True, 2)}
shapes = [tuple(map(int, x.split("x"))) for x in sys.argv[1].split(",")]
res = {(sh, n): [] for sh in shapes for n in settings}
for rnd in range(int(sys.argv[2])):
    for sh in shapes:
        for n in (list(settings) if rnd % 2 == 0 else list(settings)[::-1]):
            settings[n](); res[(sh, n)].append(round(bench_decode(engine, *sh, 8) * 1e3, 1))
for (sh, n), v in res.items(): print(sh, n, v)
