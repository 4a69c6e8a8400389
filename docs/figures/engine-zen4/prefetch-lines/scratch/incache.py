import os, sys, time
os.sched_setaffinity(0, [1])
import torch
torch.set_num_threads(1)
from splitserve.engine.kernels import load_cpu_kernels
from splitserve.engine.kv_cache import zeros_on_huge_pages
k = load_cpu_kernels()
HEADS, KVH, D, BLOCK = 9, 3, 64, 16
batch, context, iters = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
width = -(-context // BLOCK); nb = batch * width
def cache():
    v = torch.randn(nb, KVH, BLOCK, D).bfloat16()
    return zeros_on_huge_pages(tuple(v.shape), v.dtype).copy_(v)
kc, vc = cache(), cache()
tables = torch.arange(nb).view(batch, width).contiguous()
lens = torch.full((batch,), context, dtype=torch.long)
q = torch.randn(batch, HEADS, D).bfloat16()
for _ in range(20): k.decode_attention(q, kc, vc, tables, lens, D**-0.5)
best = 1e9
for r in range(5):
    t = time.perf_counter()
    for _ in range(iters): k.decode_attention(q, kc, vc, tables, lens, D**-0.5)
    best = min(best, (time.perf_counter() - t) / iters)
kv = (kc.numel() + vc.numel()) * 2
items = batch * context * KVH
print(f"{batch}x{context}: {best*1e6:.1f} us per call, {kv/best/1e9:.1f} GB/s, {best*3.3e9/items:.1f} cycles per token-kvhead @3.3GHz", flush=True)
