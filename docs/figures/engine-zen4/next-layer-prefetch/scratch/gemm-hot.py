"""The kernels' GEMM at the model's shapes (and 2048^3) with its weights in cache: GFLOP/s at 32, 64 and 96 rows.
    .venv/bin/python gemm-hot.py 2   # two threads on cores 0-1 (1: one thread on core 1)"""
import os, time, torch, sys
os.sched_setaffinity(0, [0, 1])
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
if torch.get_num_threads() == 1: os.sched_setaffinity(0, [1])
from splitserve.engine.kernels import load_cpu_kernels
k = load_cpu_kernels()
for (n, kk) in ((576, 576), (960, 576), (3072, 576), (576, 1536), (2048, 2048)):
    w = torch.randn(n, kk, dtype=torch.bfloat16)
    p = k.pack_weight(w)
    for m in (32, 64, 96):
        x = torch.randn(m, kk, dtype=torch.bfloat16)
        reps = max(3, int(2e9 / (2 * m * n * kk)))
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps): k.gemm(x, p, n, None)
            best = min(best, (time.perf_counter() - t) / reps)
        print(f"N={n} K={kk} M={m}: {2*m*n*kk/best/1e9:.0f} GFLOP/s")
