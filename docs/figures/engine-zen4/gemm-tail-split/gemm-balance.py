import sys, time, torch
from splitserve.engine.kernels import load_cpu_kernels
k = load_cpu_kernels(); torch.set_num_threads(2)
def t(m, n, kk, reps=400):
    x = torch.randn(m, kk).bfloat16(); w = torch.randn(n, kk).bfloat16(); p = k.pack_weight(w)
    for _ in range(20): k.gemm(x, p, n, None)
    best = []
    for r in range(5):
        s = time.perf_counter()
        for _ in range(reps): k.gemm(x, p, n, None)
        best.append((time.perf_counter() - s) / reps * 1e6)
    return min(best)
for m in (16, 32, 64):
    for kk in (576, 1536):
        r = {n: t(m, n, kk) for n in (512, 576, 640)}
        print(f"m={m} K={kk}: " + "  ".join(f"N={n} {v:.1f}us ({v/(n/64):.2f}/tile)" for n, v in r.items()))
