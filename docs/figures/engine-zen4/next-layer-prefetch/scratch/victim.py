"""Do software-prefetched lines that leave L2 unused stay in L3 on this CPU? Time reading a 16 MB buffer
cold, after it was read by loads, and after it was prefetched (T1 / T0 / NTA), each followed by 4 MB of
other reads that push it out of L2."""
import os, time, torch
from torch.utils.cpp_extension import load_inline
os.sched_setaffinity(0, [1]); torch.set_num_threads(1)
src = r'''
#include <torch/extension.h>
#include <immintrin.h>
int64_t touch(torch::Tensor t, int64_t mode) {  // 0 loads, 1 T1, 2 T0, 3 NTA, 4 T2
  const char* p = (const char*)t.data_ptr(); int64_t n = t.numel() * t.element_size(); int64_t s = 0;
  for (int64_t i = 0; i < n; i += 64) {
    if (mode == 0) s += *(const volatile char*)(p + i);
    else if (mode == 1) _mm_prefetch(p + i, _MM_HINT_T1);
    else if (mode == 2) _mm_prefetch(p + i, _MM_HINT_T0);
    else if (mode == 3) _mm_prefetch(p + i, _MM_HINT_NTA);
    else _mm_prefetch(p + i, _MM_HINT_T2);
    if (mode) { volatile double x = 1.0; for (int k = 0; k < 12; ++k) x = x * 1.0000001; }  // spread them out
  }
  return s;
}
double read_ns(torch::Tensor t) {
  const __m512i* p = (const __m512i*)t.data_ptr(); int64_t n = t.numel() * t.element_size() / 64;
  __m512i acc = _mm512_setzero_si512();
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; ++i) acc = _mm512_xor_si512(acc, _mm512_load_si512(p + i));
  auto t1 = std::chrono::steady_clock::now();
  volatile int64_t sink = _mm512_reduce_add_epi64(acc); (void)sink;
  return std::chrono::duration<double, std::nano>(t1 - t0).count();
}
'''
m = load_inline("victim_test", cpp_sources=src, functions=["touch", "read_ns"], extra_cflags=["-O2", "-mavx512f"], verbose=False)
A = torch.ones(16 << 20, dtype=torch.uint8)
other = torch.ones(4 << 20, dtype=torch.uint8)
flush = torch.ones(256 << 20, dtype=torch.uint8)
def cold():
    m.read_ns(flush)
names = {-1: "cold", 0: "loads", 1: "prefetch T1", 2: "prefetch T0", 3: "prefetch NTA", 4: "prefetch T2"}
for rnd in range(3):
    row = []
    for mode in (-1, 0, 1, 2, 3, 4):
        cold()
        if mode >= 0: m.touch(A, mode)
        m.read_ns(other)  # push A out of L2 (1 MB)
        ns = m.read_ns(A)
        row.append(f"{names[mode]} {A.numel() / ns:.1f} GB/s")
    print(f"round {rnd}: " + ", ".join(row), flush=True)
