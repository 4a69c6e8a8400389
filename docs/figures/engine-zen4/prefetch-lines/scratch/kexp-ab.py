# A scratch A/B of the attention alone: the kernels (load_cpu_kernels) against a scratch build of
# cpu_bf16.cpp with kexp.diff applied (as /work/scratch/kexp/kexp.cpp), whose prefetch distance, mode
# (0 block, 1 lines, 2 none) and hint are set at run time: ab.py BATCH CONTEXT DIST,MODE,HINT...
import os, sys, time, itertools, json
os.sched_setaffinity(0, [0, 1])
import torch
from torch.utils.cpp_extension import load
from splitserve.engine.kernels import CFLAGS, LDFLAGS, load_cpu_kernels
from splitserve.engine.kv_cache import zeros_on_huge_pages
from splitserve.bench.engine_bench import best_time
threads = int(os.environ.get("T", "2")); torch.set_num_threads(threads)
if threads == 1: os.sched_setaffinity(0, [0])
k = load(name="kexp", sources=["/work/scratch/kexp/kexp.cpp"], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False)
base = load_cpu_kernels()
LAYERS = int(os.environ.get("L", "30")); _, HEADS, KVH, D, BLOCK = 30, 9, 3, 64, 16
batch, context = int(sys.argv[1]), int(sys.argv[2])
order = os.environ.get("ORDER", "rand")
width = -(-context // BLOCK); nb = batch * width
def cache():
    v = torch.randn(nb, KVH, BLOCK, D).bfloat16()
    return zeros_on_huge_pages(tuple(v.shape), v.dtype).copy_(v)
caches = [(cache(), cache()) for _ in range(LAYERS)]
tables = (torch.randperm(nb) if order == "rand" else torch.arange(nb)).view(batch, width).contiguous()
lens = torch.full((batch,), context, dtype=torch.long)
q = torch.randn(batch, HEADS, D).bfloat16()
ref = base.decode_attention(q, caches[0][0], caches[0][1], tables, lens, D**-0.5)
configs = [tuple(int(x) for x in c.split(",")) for c in sys.argv[3:]]  # dist,mode,hint
for c in configs:
    k.set_pf(*c); out = k.decode_attention(q, caches[0][0], caches[0][1], tables, lens, D**-0.5)
    assert torch.equal(out, ref), c
kv = sum(a.numel() + b.numel() for a, b in caches) * 2
res = {c: [] for c in configs}; res["base"] = []
for r in range(int(os.environ.get("R", "3"))):
    for c in ["base"] + configs:
        if c == "base": fn = lambda: [base.decode_attention(q, a, b, tables, lens, D**-0.5) for a, b in caches]
        else:
            k.set_pf(*c); fn = lambda: [k.decode_attention(q, a, b, tables, lens, D**-0.5) for a, b in caches]
        s = best_time(fn, torch.device("cpu"), 3)
        res[c].append(round(kv / s / 1e9, 1))
for c, v in res.items(): print(c, v, flush=True)
