"""Upper bound of prefetching the next layer's KV into L3 during the MLP GEMMs: time each layer's decode
attention (64 x 1,024, 30 layers, random tables, 2 threads) cold, and after an untimed attention over a
subset of its sequences (the first n of each thread's run), which leaves those sequences' K/V in cache."""
import os, sys, time
import torch
os.sched_setaffinity(0, [0, 1]); torch.set_num_threads(2)
from splitserve.engine.kernels import load_cpu_kernels
from splitserve.engine.kv_cache import zeros_on_huge_pages
k_ = load_cpu_kernels()
LAYERS, HEADS, KVH, D, BLOCK = 30, 9, 3, 64, 16
batch, context = int(sys.argv[1]), int(sys.argv[2])
width = context // BLOCK; nb = batch * width
def cache():
    v = torch.randn(nb, KVH, BLOCK, D).bfloat16()
    return zeros_on_huge_pages(tuple(v.shape), v.dtype).copy_(v)
caches = [(cache(), cache()) for _ in range(LAYERS)]
tables = torch.randperm(nb).view(batch, width).contiguous()
lens = torch.full((batch,), context, dtype=torch.long)
q = torch.randn(batch, HEADS, D).bfloat16()
scale = D ** -0.5
per_seq_mb = context * KVH * D * 2 * 2 / 1e6
def subset(n):
    idx = torch.tensor(list(range(n)) + list(range(batch // 2, batch // 2 + n)))
    return q[idx].contiguous(), tables[idx].contiguous(), lens[idx].contiguous()
def run(n):
    total = 0.0
    sub = subset(n) if n else None
    for kc, vc in caches:
        if sub:
            k_.decode_attention(sub[0], kc, vc, sub[1], sub[2], scale)
        t = time.perf_counter()
        k_.decode_attention(q, kc, vc, tables, lens, scale)
        total += time.perf_counter() - t
    return total * 1e3
for n in (0, 4, 8):
    run(n)
for rnd in range(3):
    print(f"round {rnd}: " + "  ".join(f"warm {2*n} seqs ({2*n*per_seq_mb:.0f} MB): {run(n):.1f} ms" for n in (0, 4, 8, 13, 20, 0)), flush=True)
