"""warm-attn.py's upper bound, with the warm-up by prefetcht2 of the blocks (no GEMM between) instead of an
attention over them: what the next-layer prefetch could give if it cost nothing."""
import os, sys, time
import torch
from torch.utils.cpp_extension import load_inline
os.sched_setaffinity(0, [0, 1]); torch.set_num_threads(2)
src = r'''
#include <torch/extension.h>
#include <immintrin.h>
void touch_blocks(torch::Tensor cache, torch::Tensor ids, int64_t hint) {
  const char* base = (const char*)cache.data_ptr(); const int64_t bb = cache[0].numel() * 2;
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    for (int64_t o = 0; o < bb; o += 64) {
      if (hint == 2) _mm_prefetch(base + p[i] * bb + o, _MM_HINT_T2); else _mm_prefetch(base + p[i] * bb + o, _MM_HINT_T1);
      volatile double x = 1.0; for (int k = 0; k < 6; ++k) x = x * 1.0000001;
    }
}
'''
t = load_inline("touch_blocks_test", cpp_sources=src, functions=["touch_blocks"], extra_cflags=["-O2"], verbose=False)
from splitserve.engine.kernels import load_cpu_kernels
from splitserve.engine.kv_cache import zeros_on_huge_pages
k_ = load_cpu_kernels()
LAYERS, HEADS, KVH, D, BLOCK = 30, 9, 3, 64, 16
batch, context = 64, 1024
width = context // BLOCK; nb = batch * width
def cache():
    v = torch.randn(nb, KVH, BLOCK, D).bfloat16()
    return zeros_on_huge_pages(tuple(v.shape), v.dtype).copy_(v)
caches = [(cache(), cache()) for _ in range(LAYERS)]
tables = torch.randperm(nb).view(batch, width).contiguous()
lens = torch.full((batch,), context, dtype=torch.long)
q = torch.randn(batch, HEADS, D).bfloat16()
scale = D ** -0.5
def ids_for(n):
    seqs = [s for k in range(n) for s in (k, batch // 2 + k)]
    return tables[seqs].flatten().contiguous()
def run(n, hint):
    total = 0.0
    ids = ids_for(n) if n else None
    for kc, vc in caches:
        if n:
            t.touch_blocks(kc, ids, hint); t.touch_blocks(vc, ids, hint)
        s = time.perf_counter()
        k_.decode_attention(q, kc, vc, tables, lens, scale)
        total += time.perf_counter() - s
    return total * 1e3
run(0, 2)
for rnd in range(3):
    print(f"round {rnd}: cold {run(0, 2):.1f} ms, T2 13 MB {run(8, 2):.1f}, T2 20 MB {run(13, 2):.1f}, T1 20 MB {run(13, 1):.1f}, cold {run(0, 2):.1f}", flush=True)
