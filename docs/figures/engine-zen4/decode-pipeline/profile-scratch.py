# Scratch (2026-12-07): needs a build of the kernels with temporary hooks that were not kept: prof()
# (per-thread timers in run_pipelined) and set_lead(lines a K step, KB ahead). Output: profile.txt.
#   .venv/bin/python profile-scratch.py 64x1024,32x1024 ROUNDS
import os, sys, torch, time
os.sched_setaffinity(0, [0, 1]); torch.set_num_threads(2)
from splitserve.engine import EngineConfig, LLMEngine
from splitserve.bench.engine_bench import bench_decode
engine = LLMEngine(EngineConfig(kv_cache_bytes=3 << 30, max_num_seqs=128))
k = engine.runner.model.ops.k
settings = [None, (3, 384), (3, 512), (3, 768)]
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
for rnd in range(int(sys.argv[2])):
    for shape in shapes:
        out = []
        for st in (settings if rnd % 2 == 0 else settings[::-1]):
            k.set_decode_pipeline(st is not None)
            if st: k.set_lead(*st)
            k.prof(); s0 = k.pipelined_steps()
            ms = bench_decode(engine, *shape, 8) * 1e3
            n = max(1, k.pipelined_steps() - s0); v = k.prof()
            out.append((st, round(ms, 1), [round(x / n * 1e3, 1) for x in v[:5]], [round(x / n * 1e3, 1) for x in v[7:12]], v[5] // n, v[6] // n))
        for o in sorted(out, key=lambda o: str(o[0])): print(shape, *o)
