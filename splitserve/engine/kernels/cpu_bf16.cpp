// bfloat16 CPU kernels for x86 with AVX512_BF16: a weight-packed GEMM, paged decode attention,
// causal prefill attention, and fused element-wise ops. Each has a plain-torch reference in splitserve/engine/ops.py that the
// tests compare it against. Threads come from torch's OpenMP runtime (at::parallel_for, or an OpenMP
// region of at::get_num_threads() threads: parallel_items, the prefill attention, a pipelined decode
// step), never a second one.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kTileN = 64;  // output columns per packed weight tile: 4 zmm of fp32
constexpr int64_t kRowBlock = 6;  // rows per register block: 6 x 4 accumulators + 4 weights + 1
constexpr int64_t kRowGroup = 96;  // rows a work item covers; weights are re-read once per group

// Items [0, n) over the threads in one contiguous run each (of n / threads items, near enough),
// except that a thread done with its run goes on with the items left in the others' runs (each
// run's next item is taken by one atomic increment, by its owner or by a helper). A thread the OS
// takes off its core (a service of the cluster woke on it) then holds the region up by the item it
// is in, not by the rest of its run, and runs of unequal cost (sequences of different lengths) even
// out. body(state, item, next) runs every item once; next is the item its thread takes next unless
// another takes it first (-1 at a run's end); state is one State per thread, made before its first.
// An exception in body stops the items not yet taken and is raised again after the region (as
// at::parallel_for does: one escaping an OpenMP region would end the process).
template <class State, class Body>
void parallel_items(int64_t n, const Body& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    State state;
    for (int64_t i = 0; i < n; ++i) body(state, i, i + 1 < n ? i + 1 : -1);
    return;
  }
  struct alignas(64) Run {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::vector<Run> runs(threads);
  for (int64_t t = 0; t < threads; ++t) {
    runs[t].next.store(n * t / threads, std::memory_order_relaxed);
    runs[t].end = n * (t + 1) / threads;
  }
  std::atomic<bool> failed{false};
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    try {
      State state;
      const int64_t self = omp_get_thread_num();
      for (int64_t k = 0; k < threads && !failed.load(std::memory_order_relaxed); ++k) {
        Run& run = runs[(self + k) % threads];
        for (int64_t i; !failed.load(std::memory_order_relaxed) &&
                        (i = run.next.fetch_add(1, std::memory_order_relaxed)) < run.end;)
          body(state, i, i + 1 < run.end ? i + 1 : -1);
      }
    } catch (...) {
#pragma omp critical(parallel_items_error)
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  }
  if (error) std::rethrow_exception(error);
}

struct NoState {};

inline __m512 load_bf16x16(const bf16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 maskz_load_bf16x16(__mmask16 mask, const bf16* p) {
  __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store_bf16x16(bf16* p, __m512 v, __mmask16 mask) {
  __m256bh packed = _mm512_cvtneps_pbh(v);  // round to nearest even, as torch does
  _mm256_mask_storeu_epi16(p, mask, reinterpret_cast<__m256i&>(packed));
}

inline __mmask16 tail_mask(int64_t remaining) {
  if (remaining <= 0) return 0;
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1);
}

// exp(x) for x <= 0 via 2^n * 2^f with a degree-6 polynomial on f in [-0.5, 0.5] (rel. error ~1e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 round_bf16x16(__m512 v) {
  __m256bh b = _mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(b)), 16));
}

// ---------------------------------------------------------------------------------------------
// GEMM: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), W packed as [N/64, K/2, 64, 2] so that one
// tile's 64 columns stream contiguously and each 32-bit lane holds a K-pair for vdpbf16ps.

torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_weight: 2-D bfloat16 weight");
  w = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t tiles = (n + kTileN - 1) / kTileN, k2 = (k + 1) / 2;
  auto out = torch::zeros({tiles, k2, kTileN, 2}, w.options());
  const bf16* src = w.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < kTileN && t * kTileN + j < n; ++j)
        for (int64_t kk = 0; kk < k; ++kk)
          dst[((t * k2 + kk / 2) * kTileN + j) * 2 + kk % 2] = src[(t * kTileN + j) * k + kk];
  });
  return out;
}

inline void store_out(bf16* p, __m512 v, __mmask16 mask) { store_bf16x16(p, v, mask); }
inline void store_out(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }

// A tile's row blocks each read it whole, the first from memory. From kPrefetchBlocks row blocks on,
// each block also prefetches its share of the next tile into L2, spread over its K loop, so that read
// overlaps this tile's arithmetic instead of stalling the next tile's first block: 32-row GEMMs over
// a model's weights 20% faster (docs/benchmarks.md). With fewer blocks it costs more than it hides.
constexpr int64_t kPrefetchBlocks = 3;

// One thread's decode attention passes within a pipelined decode step (DecodeLayers::run_pipelined):
// two per sequence (its logits over K, then its P V over V), run in order between the GEMM tiles the
// thread computes meanwhile, and a prefetch into L2 that runs ahead of them, issued by those tiles'
// row blocks (kLeadLines lines a K step), at most kLeadMax lines ahead of what the passes have read.
// A pass runs once it is prefetched whole (or as far as the prefetch may go): it reads its K or V
// from L2 instead of memory, and memory streams them while the GEMMs compute.
constexpr int kLeadLines = 2;  // 2-4 alike at 32-64 x 1,024 on AMD's Zen 4, 2 quicker at 64 x 512
constexpr int64_t kLeadMax = 8192;  // 512 KB of a 1-2 MB L2 (a tile of weights is 72-192 KB); 384-768 alike

struct PassQueue {
  const bf16 *kc = nullptr, *vc = nullptr;  // one layer's caches
  const int64_t *tables = nullptr, *lens = nullptr;
  int64_t width = 0, block_size = 0, block_elems = 0;  // block_elems: a block's every head
  int64_t first = 0, passes = 0;  // sequences first.. of the batch, two passes each
  int64_t done = 0;  // passes run
  int64_t lead = 0, lead_block = 0;  // the pass the prefetch is in, and its next block
  const char* line = nullptr;  // the next line to prefetch, and how many are left in its block
  int64_t block_left = 0;
  int64_t issued = 0, read = 0;  // lines prefetched; lines of the passes done

  int64_t seq(int64_t pass) const { return first + pass / 2; }
  int64_t blocks(int64_t pass) const { return (lens[seq(pass)] + block_size - 1) / block_size; }
  int64_t block_lines() const { return block_elems * static_cast<int64_t>(sizeof(bf16)) / 64; }
  // The next pass is prefetched whole, or as far as the prefetch may run ahead.
  bool ready() const { return done < passes && (lead > done || issued - read >= kLeadMax); }
  void pass_done() {
    read += blocks(done++) * block_lines();
    if (lead >= done) return;
    lead = done;  // the pass ran before its prefetch was through: the prefetch goes on from the next
    lead_block = block_left = 0;
    issued = read;
  }
  // n more lines, inline while they are in the block being prefetched (a GEMM's K step calls this).
  void issue(int n) {
    if (block_left > n && issued + n <= read + kLeadMax) {
      for (int i = 0; i < n; ++i) _mm_prefetch(line + i * 64, _MM_HINT_T1);
      line += n * 64;
      block_left -= n;
      issued += n;
      return;
    }
    issue_across(n);
  }
  void issue_across(int n) {
    for (; n > 0 && issued < read + kLeadMax; --n) {
      if (block_left == 0) {
        if (lead >= passes) return;
        const bf16* cache = lead % 2 ? vc : kc;
        line = reinterpret_cast<const char*>(cache + tables[seq(lead) * width + lead_block] * block_elems);
        block_left = block_lines();
      }
      _mm_prefetch(line, _MM_HINT_T1);
      line += 64;
      ++issued;
      if (--block_left > 0 || ++lead_block < blocks(lead)) continue;
      lead_block = 0;  // the pass is prefetched whole
      ++lead;
    }
  }
};

template <int MB, typename Out, bool Lead = false>
void gemm_block(const uint32_t* x, int64_t ldx, const bf16* tile, int64_t k2, const float* bias,
                Out* out, int64_t ldo, int64_t ncols, const char* prefetch, int64_t prefetch_lines,
                PassQueue* passes) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t line = 0;
  for (int64_t kk = 0; kk < k2; ++kk) {
    for (; line < prefetch_lines && line * k2 < (kk + 1) * prefetch_lines; ++line)
      _mm_prefetch(prefetch + line * 64, _MM_HINT_T1);
    if constexpr (Lead) passes->issue(kLeadLines);
    const __m512i* wp = reinterpret_cast<const __m512i*>(tile + kk * kTileN * 2);
    __m512bh w[4];
    for (int j = 0; j < 4; ++j) {
      __m512i raw = _mm512_loadu_si512(wp + j);
      w[j] = reinterpret_cast<__m512bh&>(raw);
    }
    for (int m = 0; m < MB; ++m) {
      __m512i xb = _mm512_set1_epi32(static_cast<int>(x[m * ldx + kk]));
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], reinterpret_cast<__m512bh&>(xb), w[j]);
    }
  }
  for (int j = 0; j < 4 && j * 16 < ncols; ++j) {
    const __mmask16 mask = tail_mask(ncols - j * 16);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + j * 16) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) store_out(out + m * ldo + j * 16, _mm512_add_ps(acc[m][j], b), mask);
  }
}

template <typename Out>
using BlockFn = void (*)(const uint32_t*, int64_t, const bf16*, int64_t, const float*, Out*, int64_t, int64_t,
                         const char*, int64_t, PassQueue*);
template <typename Out>
constexpr BlockFn<Out> kBlocks[kRowBlock + 1] = {nullptr, gemm_block<1, Out>, gemm_block<2, Out>, gemm_block<3, Out>,
                                                 gemm_block<4, Out>, gemm_block<5, Out>, gemm_block<6, Out>};
template <typename Out>
constexpr BlockFn<Out> kLeadBlocks[kRowBlock + 1] = {
    nullptr, gemm_block<1, Out, true>, gemm_block<2, Out, true>, gemm_block<3, Out, true>,
    gemm_block<4, Out, true>, gemm_block<5, Out, true>, gemm_block<6, Out, true>};

// One thread's share: rows [r0, r1) of x (k2 K-pairs each, row stride ldx in pairs) against weight
// tiles [t0, t1) of a packed weight whose tiles hold tile_k2 K-pairs (k2 <= tile_k2), in row blocks
// as equal as they can be. With prefetch on and at least kPrefetchBlocks blocks, each tile's blocks
// prefetch the next tile, and the last tile's the one at after (the tile this thread takes next, or
// nullptr). With a PassQueue, the blocks also issue its prefetch.
template <typename Out>
void gemm_rows(const uint32_t* x, int64_t ldx, int64_t r0, int64_t r1, const bf16* packed, int64_t tile_k2,
               int64_t k2, int64_t t0, int64_t t1, int64_t n, const float* bias, Out* out, int64_t ldo,
               bool prefetch = false, const bf16* after = nullptr, PassQueue* passes = nullptr) {
  const BlockFn<Out>* block_fns = passes ? kLeadBlocks<Out> : kBlocks<Out>;
  const int64_t blocks = (r1 - r0 + kRowBlock - 1) / kRowBlock;
  const int64_t lines = k2 * kTileN * 2 * static_cast<int64_t>(sizeof(bf16)) / 64;  // of one tile
  const int64_t share = prefetch && blocks >= kPrefetchBlocks ? lines / blocks : 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t col = t * kTileN, ncols = std::min(kTileN, n - col);
    const bf16* tile = packed + t * tile_k2 * kTileN * 2;
    const bf16* next_tile = t + 1 < t1 ? tile + tile_k2 * kTileN * 2 : after;
    const char* next = share && next_tile ? reinterpret_cast<const char*>(next_tile) : nullptr;
    int64_t r = r0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t rows = (r1 - r + blocks - b - 1) / (blocks - b);
      const int64_t block_lines = next ? (b + 1 < blocks ? share : lines - b * share) : 0;
      block_fns[rows](x + r * ldx, ldx, tile, k2, bias ? bias + col : nullptr, out + r * ldo + col, ldo, ncols,
                      next ? next + b * share * 64 : nullptr, block_lines, passes);
      r += rows;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The same GEMM on AMX tiles, where the CPU has AMX_BF16 and the process was granted its state.
// A block of 32 rows x 32 columns is four fp32 accumulator tiles (tmm0-3), fed by two row tiles of
// x (tmm4-5: 16 rows x 32 K) and two column tiles of the packed weight (tmm6-7: 16 K-pairs x 16
// columns, read in place: a packed tile's K-pair rows are 256 bytes apart). K must be a multiple of
// 32; rows past the end of x come from a zeroed copy, columns past n are the packed tile's zeros.

#if defined(__GNUC__) && __GNUC__ >= 11
#define SPLITSERVE_AMX 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#else
#define SPLITSERVE_AMX 0
#define AMX_TARGET
#endif

constexpr int64_t kAmxRows = 32;  // rows per AMX block: two 16-row tiles
constexpr int64_t kAmxPairs = 16;  // K-pairs per tile step
bool g_amx_granted = false;  // the process holds the tile state (amx_enable)
bool g_amx = false;  // GEMMs and prefill attention use it

// Asks Linux for the AMX tile state (off for every process until asked); true if granted, and
// GEMMs and prefill attention then use AMX.
bool amx_enable() {
#if SPLITSERVE_AMX
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (!g_amx_granted) g_amx_granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#endif
  g_amx = g_amx_granted;
  return g_amx;
}

bool amx_enabled() { return g_amx; }
void set_amx(bool on) { g_amx = on && g_amx_granted; }

#if SPLITSERVE_AMX
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Eight tiles of 16 rows x 64 bytes. A constant in memory: GCC drops stores to a local config
// before ldtilecfg, whose asm does not say that it reads them.
constexpr TileConfig kTileConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

AMX_TARGET void amx_configure() { _tile_loadconfig(&kTileConfig); }

// out[r0:r1, tiles t0..t1] for x [m, 2 * k2] (row stride ldx pairs) against a packed weight whose
// tiles hold tile_k2 K-pairs; k2 % kAmxPairs == 0, k2 <= tile_k2, r0 a multiple of kAmxRows. A last
// block shorter than kAmxRows reads its rows from tail, a zero-padded copy of rows
// [m / kAmxRows * kAmxRows, m) with row stride k2, or, where tail is null, from x itself, whose
// memory must then reach the block's end (the rows past m are computed but not stored).
//
// With prefetch, each K step's first half also prefetches the next K step's 4 KB of the weight
// (past a tile's end: the next tile's start, which the same thread takes next). A GEMM of one row
// block reads each weight tile once, from memory, and this overlaps that read with the tile
// products: 7-12% faster at 1-32 rows on one or two cores. With more row blocks the tile is
// re-read from cache and it was 6-10% slower at 64 rows on two cores, so there it is off.
template <typename Out>
AMX_TARGET void amx_rows(const uint32_t* x, int64_t ldx, int64_t m, const uint32_t* tail, int64_t r0, int64_t r1,
                         const bf16* packed, int64_t tile_k2, int64_t k2, int64_t t0, int64_t t1, int64_t n,
                         const float* bias, Out* out, int64_t ldo, bool prefetch) {
  alignas(64) float acc[kAmxRows * kAmxRows];
  for (int64_t r = r0; r < r1; r += kAmxRows) {
    const int64_t rows = std::min(kAmxRows, r1 - r);
    const bool from_tail = tail && r + kAmxRows > m;
    const uint32_t* a = from_tail ? tail : x + r * ldx;
    const int64_t lda = from_tail ? k2 : ldx;
    // A block of at most 16 rows (a decode step of few sequences) uses one row tile and half the
    // tile products. Each output element sums the same products in the same order either way, so a
    // row's result never depends on the rows beside it.
    const bool two = rows > 16;
    for (int64_t t = t0; t < t1; ++t) {
      const bf16* tile = packed + t * tile_k2 * kTileN * 2;
      for (int64_t half = 0; half < kTileN / kAmxRows; ++half) {
        const int64_t col = t * kTileN + half * kAmxRows;
        if (col >= n) break;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kk = 0; kk < k2; kk += kAmxPairs) {
          const bf16* b = tile + (kk * kTileN + half * kAmxRows) * 2;
          if (prefetch && half == 0) {  // an address, not a pointer: past the weight's end it is only a hint
            const uintptr_t next = reinterpret_cast<uintptr_t>(tile) + (kk + kAmxPairs) * kTileN * 2 * sizeof(bf16);
            for (uintptr_t line = 0; line < kAmxPairs * kTileN * 2 * sizeof(bf16); line += 64)
              _mm_prefetch(reinterpret_cast<const char*>(next + line), _MM_HINT_T0);
          }
          _tile_loadd(4, a + kk, lda * 4);
          _tile_loadd(6, b, kTileN * 4);
          _tile_loadd(7, b + 32, kTileN * 4);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, a + 16 * lda + kk, lda * 4);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, acc, kAmxRows * 4);
        _tile_stored(1, acc + 16, kAmxRows * 4);
        if (two) {
          _tile_stored(2, acc + 16 * kAmxRows, kAmxRows * 4);
          _tile_stored(3, acc + 16 * kAmxRows + 16, kAmxRows * 4);
        }
        for (int64_t j = 0; j < 2; ++j) {
          const __mmask16 mask = tail_mask(n - col - j * 16);
          if (!mask) break;
          const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + col + j * 16) : _mm512_setzero_ps();
          for (int64_t i = 0; i < rows; ++i)
            store_out(out + (r + i) * ldo + col + j * 16, _mm512_add_ps(_mm512_load_ps(acc + i * kAmxRows + j * 16), bv),
                      mask);
        }
      }
    }
  }
}

AMX_TARGET void amx_release() { _tile_release(); }

torch::Tensor amx_gemm(const uint32_t* xp, int64_t m, int64_t k2, const bf16* wp, int64_t tiles, int64_t n,
                       const float* b, torch::Tensor out) {
  // Row groups of whole 32-row blocks (at most 3), as many as a multiple of the threads past one.
  const int64_t blocks = (m + kAmxRows - 1) / kAmxRows, threads = at::get_num_threads();
  int64_t groups = (blocks + 2) / 3;
  if (groups > 1 && threads > 1) groups = (groups + threads - 1) / threads * threads;
  groups = std::min(groups, blocks);
  const int64_t group_rows = (blocks + groups - 1) / groups * kAmxRows;
  bf16* op = out.data_ptr<bf16>();
  const int64_t tail_row = m / kAmxRows * kAmxRows;
  std::vector<uint32_t> tail;  // the last block's rows, zero-padded, where m is not whole blocks
  if (tail_row < m) {
    tail.assign(kAmxRows * k2, 0);
    std::copy(xp + tail_row * k2, xp + m * k2, tail.data());
  }
  const uint32_t* tp = tail.empty() ? nullptr : tail.data();
  at::parallel_for(0, groups * tiles, 1, [&](int64_t i0, int64_t i1) {
    amx_configure();
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t g = item / tiles, t = item % tiles;
      const int64_t r0 = g * group_rows, r1 = std::min(m, r0 + group_rows);
      if (r0 < r1) amx_rows<bf16>(xp, k2, m, tp, r0, r1, wp, k2, k2, t, t + 1, n, b, op, n, m <= kAmxRows);
    }
    amx_release();
  });
  return out;
}
#endif

torch::Tensor gemm(torch::Tensor x, torch::Tensor packed, int64_t n, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "gemm: 2-D bfloat16 input");
  const int64_t m = x.size(0), k2 = packed.size(1), tiles = packed.size(0);
  TORCH_CHECK(x.size(1) == 2 * k2 || x.size(1) + 1 == 2 * k2, "gemm: K does not match the packed weight");
  if (x.size(1) != 2 * k2) x = torch::constant_pad_nd(x, {0, 1});
  x = x.contiguous();
  auto out = torch::empty({m, n}, x.options());
  c10::optional<torch::Tensor> bias_f32;
  if (bias.has_value()) bias_f32 = bias->to(at::kFloat).contiguous();
  const float* b = bias_f32 ? bias_f32->data_ptr<float>() : nullptr;
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<bf16>());
  const bf16* wp = packed.data_ptr<bf16>();
#if SPLITSERVE_AMX
  // Every GEMM of a weight with K a multiple of 32 runs on AMX, however few its rows: AVX512 sums in
  // another order, and a row's result must not depend on how many rows share its step (a request's
  // tokens would then depend on the batch it decodes in). At 1-2 rows AVX512 would be 1.0-1.5x faster.
  if (g_amx && k2 % kAmxPairs == 0) return amx_gemm(xp, m, k2, wp, tiles, n, b, out);
#endif
  bf16* op = out.data_ptr<bf16>();
  // Row groups of at most kRowGroup rows, as equal as they can be and, past one, as many as a
  // multiple of the threads: parallel_for hands each thread an equal run of items, and groups of
  // unequal rows (96 + 32 for 128 rows) left one of two threads a quarter of the work.
  int64_t groups = (m + kRowGroup - 1) / kRowGroup;
  const int64_t threads = at::get_num_threads();
  if (groups > 1 && threads > 1) groups = (groups + threads - 1) / threads * threads;
  groups = std::min(groups, m);
  const int64_t group_rows = (m + groups - 1) / groups;
  // Items run tile-major within a row group, so with few rows each thread streams a contiguous
  // run of weight tiles.
  parallel_items<NoState>(groups * tiles, [&](NoState&, int64_t item, int64_t next) {
    const int64_t g = item / tiles, t = item % tiles;
    const int64_t r0 = g * group_rows, r1 = std::min(m, r0 + group_rows);
    const bf16* after = next == item + 1 && t + 1 < tiles ? wp + (t + 1) * k2 * kTileN * 2 : nullptr;
    if (r0 < r1) gemm_rows<bf16>(xp, k2, r0, r1, wp, k2, k2, t, t + 1, n, b, op, n, true, after);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Decode attention: one query token per sequence over its paged K/V. q [B, Hq, D]; caches
// [num_blocks, Hkv, block_size, D] in the tiled layout below; block_tables [B, W] int64;
// context_lens [B] int64.
//
// The caches' (block, head) tiles of block_size tokens x D dims are stored so that one 64-byte
// vector needs no shuffle (block_size a multiple of 16):
//   K: [block_size / 16, D / 2, 16, 2]: a vector holds one dim pair of 16 tokens, so q . K of 16
//      tokens is D / 2 vdpbf16ps with q's pair broadcast, and no sum across lanes;
//   V: [block_size / 2, D, 2]: a vector holds 16 dims of two tokens, so P V is one vdpbf16ps per
//      16 dims with the two tokens' probabilities broadcast, and the lanes are in dim order.
// rope_write_kv writes them so; retile_kv converts whole blocks to and from the plain
// [block_size, D] rows in which blocks travel between processes.

constexpr int kMaxGroup = 16;

// Element offsets, within a (block, head) tile of D dims, of K's dim `dim` of token `off`, and of V's.
inline int64_t tiled_k_offset(int64_t off, int64_t dim, int64_t d) {
  return ((off / 16 * (d / 2) + dim / 2) * 16 + off % 16) * 2 + dim % 2;
}
inline int64_t tiled_v_offset(int64_t off, int64_t dim, int64_t d) { return (off / 2 * d + dim) * 2 + off % 2; }

struct Scratch {
  std::vector<float> scores;   // [heads * group, ctx] logits
  std::vector<uint16_t> probs; // [heads * group, ctx rounded up to even] probabilities as bfloat16 bits
  std::vector<float> acc;      // [heads * group, d] fp32 accumulators
  std::vector<float> inv_sum;  // [heads * group] 1 / softmax denominator
};

// Softmax numerators (max-subtracted exp) of each row of scores, written as bfloat16 bits to
// probs (row stride probs_stride); inv_sum gets 1 / row sum, applied after P V.
void softmax_rows(const float* scores, int64_t rows, int64_t ctx, uint16_t* probs, int64_t probs_stride,
                  float* inv_sum) {
  for (int64_t g = 0; g < rows; ++g) {
    const float* s = scores + g * ctx;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < ctx; t += 16)
      vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(ctx - t), s + t));
    vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < ctx; t += 16) {
      const __mmask16 mask = tail_mask(ctx - t);
      const __m512 e = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + t), vmx)));
      store_bf16x16(reinterpret_cast<bf16*>(probs + g * probs_stride + t), e, mask);
      sum = _mm512_add_ps(sum, e);
    }
    if (ctx & 1) probs[g * probs_stride + ctx] = 0;  // the last pair's partner multiplies a zero V lane
    inv_sum[g] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}

// Each pass (logits, then P V) goes block by block and prefetches the blocks ahead meanwhile, in
// one of three ways (set_attention_prefetch):
//  - "l2": a whole block kPrefetchTiles ahead at the start of each block, into L2. On Sapphire
//    Rapids at batch 32-64 a third faster than no prefetch on 2 cores, where into L1 was no faster
//    (it evicts rows still in use). The default.
//  - "l1": the same into L1: on AMD Zen 5 (48 KB L1) the step at 64 x 1,024 tokens 6-10% quicker.
//  - "l2-lines": into L2, one line for each line the pass reads, kPrefetchTokens ahead, so the
//    prefetches go out as evenly as the reads instead of a block's worth at once. On AMD Zen 4 the
//    decode step at context 1,024 is 7-10% quicker than with "l2" at batch 32-64 (16 to 64 tokens
//    ahead alike, 128 and 256 less), and level at context 256.
enum class Prefetch { kL2 = 0, kL1 = 1, kL2Lines = 2 };
constexpr int64_t kPrefetchTiles = 2;
constexpr int64_t kPrefetchTokens = 64;
Prefetch g_prefetch = Prefetch::kL2;
const char* const kPrefetchNames[] = {"l2", "l1", "l2-lines"};

inline void prefetch_span(const bf16* p, int64_t elements) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < elements * static_cast<int64_t>(sizeof(bf16)); b += 64) {
    if (g_prefetch == Prefetch::kL1)
      _mm_prefetch(c + b, _MM_HINT_T0);
    else
      _mm_prefetch(c + b, _MM_HINT_T1);
  }
}

void set_attention_prefetch(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kPrefetchNames[i]) {
      g_prefetch = static_cast<Prefetch>(i);
      return;
    }
  TORCH_CHECK(false, "attention prefetch: one of l2, l1, l2-lines, not ", name);
}
std::string attention_prefetch() { return kPrefetchNames[static_cast<int>(g_prefetch)]; }

// A vector's bits as bfloat16 pairs. A value cast: GCC kept accumulators fed through a
// reinterpret_cast reference in memory, storing each one after every product.
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// Logits of H query heads (q32: the first's dim pairs, the next qstride pairs on) for the 16
// tokens of one K group (kt: its [D/2, 16, 2] elements), the first `valid` stored to out, each head's
// row out_stride apart. Four chains of products per head (dim pairs 4i + j in chain j), summed in a
// fixed order.
// Lines mode: pf is the K (or V) lines to prefetch as kt's are read, a line for each (see attend).
template <int D16, int H, bool Lines = false>
__attribute__((always_inline)) inline void scores_group(const uint32_t* q32, int64_t qstride, const bf16* kt,
                                                        __m512 vscale, float* out, int64_t out_stride,
                                                        int64_t valid, const bf16* pf = nullptr) {
  constexpr int64_t pairs = D16 * 8;
  __m512 acc[H][4];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < 4; ++j) acc[h][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p += 4)
    for (int j = 0; j < 4; ++j) {
      if constexpr (Lines) _mm_prefetch(reinterpret_cast<const char*>(pf + (p + j) * 32), _MM_HINT_T1);
      const __m512i k = _mm512_loadu_si512(kt + (p + j) * 32);
      for (int h = 0; h < H; ++h)
        acc[h][j] = _mm512_dpbf16_ps(acc[h][j], as_bh(k),
                                     as_bh(_mm512_set1_epi32(static_cast<int>(q32[h * qstride + p + j]))));
    }
  for (int h = 0; h < H; ++h) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[h][0], acc[h][1]), _mm512_add_ps(acc[h][2], acc[h][3]));
    _mm512_mask_storeu_ps(out + h * out_stride, tail_mask(valid), _mm512_mul_ps(sum, vscale));
  }
}

// Query heads per logits call: 4 H accumulators, a K vector and a broadcast in registers.
constexpr int kQkHeads = 4;

template <int D16, int H, bool Lines = false>
void scores_rest(int64_t rest, const uint32_t* q32, int64_t qstride, const bf16* kt, __m512 vscale, float* out,
                 int64_t out_stride, int64_t valid, const bf16* pf = nullptr) {
  if constexpr (H > 0) {
    if (rest == H) return scores_group<D16, H, Lines>(q32, qstride, kt, vscale, out, out_stride, valid, pf);
    scores_rest<D16, H - 1, Lines>(rest, q32, qstride, kt, vscale, out, out_stride, valid, pf);
  }
}

// acc[h] += P[h] V for one pair of tokens (vp: the pair's [D, 2] elements; lanes of `mask` read,
// the rest 0) and H query heads, whose probabilities sit probs_stride pairs apart.
template <int D16, int H, bool Lines = false>
__attribute__((always_inline)) inline void pv_pair(const bf16* vp, const uint32_t* probs, int64_t probs_stride,
                                                   __mmask32 mask, __m512 (&acc)[H][D16], const bf16* pf) {
  if constexpr (Lines)
    for (int c = 0; c < D16; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + c * 32), _MM_HINT_T1);
  __m512i pb[H];
  for (int h = 0; h < H; ++h) pb[h] = _mm512_set1_epi32(static_cast<int>(probs[h * probs_stride]));
  for (int c = 0; c < D16; ++c) {
    const __m512i v = _mm512_maskz_loadu_epi16(mask, vp + c * 32);
    for (int h = 0; h < H; ++h) acc[h][c] = _mm512_dpbf16_ps(acc[h][c], as_bh(v), as_bh(pb[h]));
  }
}

// acc_mem[h] (lanes in dim order) += P[h] V over the first npairs pairs of one V tile (vt); a last
// pair holding one token (odd_last) reads its partner's lanes as 0, whose probability is 0 too. Lines
// mode: pf is the lines to prefetch as vt's are read, a line for each (see attend).
template <int D16, int H, bool Lines = false>
__attribute__((always_inline)) inline void pv_tile(const bf16* vt, int64_t npairs, bool odd_last,
                                                   const uint32_t* probs, int64_t probs_stride, float* acc_mem,
                                                   const bf16* pf = nullptr) {
  constexpr int64_t d = D16 * 16;
  __m512 acc[H][D16];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < D16; ++c) acc[h][c] = _mm512_loadu_ps(acc_mem + h * d + c * 16);
  for (int64_t j = 0; j + 1 < npairs; ++j)
    pv_pair<D16, H, Lines>(vt + j * d * 2, probs + j, probs_stride, __mmask32(0xFFFFFFFF), acc,
                           Lines ? pf + j * d * 2 : nullptr);
  pv_pair<D16, H, Lines>(vt + (npairs - 1) * d * 2, probs + npairs - 1, probs_stride,
                         odd_last ? __mmask32(0x55555555) : __mmask32(0xFFFFFFFF), acc,
                         Lines ? pf + (npairs - 1) * d * 2 : nullptr);
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < D16; ++c) _mm512_storeu_ps(acc_mem + h * d + c * 16, acc[h][c]);
}

// Query heads per P V call: as many as keep every accumulator in a register (16 of the 32 zmm).
template <int D16>
constexpr int kPvHeads = D16 >= 16 ? 1 : 16 / D16;

template <int D16, int H, bool Lines = false>
void pv_rest(int64_t rest, const bf16* vt, int64_t npairs, bool odd_last, const uint32_t* probs,
             int64_t probs_stride, float* acc, const bf16* pf = nullptr) {
  if constexpr (H > 0) {
    if (rest == H) return pv_tile<D16, H, Lines>(vt, npairs, odd_last, probs, probs_stride, acc, pf);
    pv_rest<D16, H - 1, Lines>(rest, vt, npairs, odd_last, probs, probs_stride, acc, pf);
  }
}

// The passes attend runs: the logits over K and their softmax, the P V over V, or both. Run one at a
// time, the second must come after the first of the same call's arguments, with the same scratch.
constexpr int kLogitsPass = 1, kValuesPass = 2, kBothPasses = 3;

// KV heads [h0, h1) of one sequence, in two passes over its context (logits, then P V), block by
// block: a block's tiles for those heads are adjacent in memory, so each pass streams whole blocks.
// Lines: the "l2-lines" prefetch, else a whole block kPrefetchTiles ahead ("l2", "l1"). In lines
// mode the logits pass's last blocks prefetch the first of V, and the P V pass's last blocks the
// first of K of the sequence this thread attends next (next_table, next_ctx; none: nullptr), so
// neither pass starts by waiting on memory.
template <int D16, bool Lines>
void attend(const bf16* q, const bf16* kc, const bf16* vc, const int64_t* table, int64_t ctx,
            int64_t block_size, int64_t hkv, int64_t h0, int64_t h1, int64_t group, float scale, bf16* out,
            const int64_t* next_table, int64_t next_ctx, Scratch& scratch, int passes) {
  constexpr int64_t d = D16 * 16;
  constexpr int hg = kPvHeads<D16>;
  const int64_t heads = h1 - h0, rows_q = heads * group, stride = ctx + (ctx & 1), tile = block_size * d;
  const int64_t blocks = (ctx + block_size - 1) / block_size;
  const __m512 vscale = _mm512_set1_ps(scale);
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(q);
  const int64_t qstride = d / 2;  // pairs from one query head's q to the next's
  // Caches are [block, head, tile]: heads h0..h1 of a block are one span of heads * tile elements.
  auto tiles = [&](const bf16* cache, int64_t b) { return cache + (table[b] * hkv + h0) * tile; };
  // Blocks prefetched ahead. In lines mode each line read prefetches its counterpart `ahead` blocks
  // on, counted on past the pass's last block into the next pass's first: V's after K's, then the
  // next sequence's K (past those, the line being read: a no-op). Only a KV head's first call (its
  // first query-head group) prefetches; the others read the same lines.
  const int64_t ahead = Lines ? std::max<int64_t>(1, kPrefetchTokens / block_size) : kPrefetchTiles;
  const int64_t next_blocks = next_table ? (next_ctx + block_size - 1) / block_size : 0;
  auto k_ahead = [&](int64_t b, int64_t h, int64_t t, const bf16* here) {
    const int64_t j = b + ahead - blocks;
    if (j < 0) return tiles(kc, b + ahead) + h * tile + t * d;
    return j < blocks ? tiles(vc, j) + h * tile + t * d : here;
  };
  auto v_ahead = [&](int64_t b, int64_t h, const bf16* here) {
    const int64_t j = b + ahead - blocks;
    if (j < 0) return tiles(vc, b + ahead) + h * tile;
    return j < next_blocks ? kc + (next_table[j] * hkv + h0) * tile + h * tile : here;
  };
  if (passes & kLogitsPass) {
    scratch.scores.resize(rows_q * ctx);
    scratch.probs.resize(rows_q * stride);
    scratch.inv_sum.resize(rows_q);
    for (int64_t b = 0; b < std::min(blocks, ahead); ++b) prefetch_span(tiles(kc, b), heads * tile);
    for (int64_t b = 0; b < blocks; ++b) {
      if (!Lines && b + ahead < blocks) prefetch_span(tiles(kc, b + ahead), heads * tile);
      for (int64_t t = 0; t < std::min(block_size, ctx - b * block_size); t += 16) {
        const int64_t pos = b * block_size + t;
        for (int64_t h = 0; h < heads; ++h) {
          const bf16* kt = tiles(kc, b) + h * tile + t * d;
          const bf16* pf = Lines ? k_ahead(b, h, t, kt) : kt;
          const uint32_t* qh = q32 + h * group * qstride;
          float* sh = scratch.scores.data() + h * group * ctx + pos;
          int64_t g = 0;
          if constexpr (Lines) {  // the first query-head group prefetches; the rest read what it did
            if (group < kQkHeads) {
              scores_rest<D16, kQkHeads - 1, true>(group, qh, qstride, kt, vscale, sh, ctx, ctx - pos, pf);
              continue;
            }
            scores_group<D16, kQkHeads, true>(qh, qstride, kt, vscale, sh, ctx, ctx - pos, pf);
            g = kQkHeads;
          }
          for (; g + kQkHeads <= group; g += kQkHeads)
            scores_group<D16, kQkHeads>(qh + g * qstride, qstride, kt, vscale, sh + g * ctx, ctx, ctx - pos);
          scores_rest<D16, kQkHeads - 1>(group - g, qh + g * qstride, qstride, kt, vscale, sh + g * ctx, ctx,
                                         ctx - pos);
        }
      }
    }
    softmax_rows(scratch.scores.data(), rows_q, ctx, scratch.probs.data(), stride, scratch.inv_sum.data());
  }
  if (!(passes & kValuesPass)) return;
  scratch.acc.assign(rows_q * d, 0.0f);
  const uint32_t* probs = reinterpret_cast<const uint32_t*>(scratch.probs.data());
  const int64_t pstride = stride / 2;
  for (int64_t b = 0; b < std::min(blocks, ahead); ++b) prefetch_span(tiles(vc, b), heads * tile);
  for (int64_t b = 0; b < blocks; ++b) {
    if (!Lines && b + ahead < blocks) prefetch_span(tiles(vc, b + ahead), heads * tile);
    const int64_t n = std::min(block_size, ctx - b * block_size), npairs = (n + 1) / 2;
    const uint32_t* pb = probs + b * block_size / 2;
    for (int64_t h = 0; h < heads; ++h) {
      const bf16* vt = tiles(vc, b) + h * tile;
      const bf16* pf = Lines ? v_ahead(b, h, vt) : vt;
      int64_t g = 0;
      if constexpr (Lines) {  // as in the logits pass
        if (group < hg) {
          pv_rest<D16, hg - 1, true>(group, vt, npairs, n & 1, pb + h * group * pstride, pstride,
                                     scratch.acc.data() + h * group * d, pf);
          continue;
        }
        pv_tile<D16, hg, true>(vt, npairs, n & 1, pb + h * group * pstride, pstride,
                               scratch.acc.data() + h * group * d, pf);
        g = hg;
      }
      for (; g + hg <= group; g += hg)
        pv_tile<D16, hg>(vt, npairs, n & 1, pb + (h * group + g) * pstride, pstride,
                         scratch.acc.data() + (h * group + g) * d);
      pv_rest<D16, hg - 1>(group - g, vt, npairs, n & 1, pb + (h * group + g) * pstride, pstride,
                           scratch.acc.data() + (h * group + g) * d);
    }
  }
  for (int64_t r = 0; r < rows_q; ++r)
    for (int64_t c = 0; c < D16; ++c)
      store_bf16x16(out + r * d + c * 16,
                    _mm512_mul_ps(_mm512_loadu_ps(scratch.acc.data() + r * d + c * 16), _mm512_set1_ps(scratch.inv_sum[r])),
                    0xFFFF);
}

using AttendFn = void (*)(const bf16*, const bf16*, const bf16*, const int64_t*, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, float, bf16*, const int64_t*, int64_t, Scratch&, int);
// By head_dim / 16: the block prefetch's, then the lines prefetch's.
constexpr AttendFn kAttend[2][17] = {
    {nullptr, nullptr, attend<2, false>, nullptr, attend<4, false>, nullptr, attend<6, false>, nullptr,
     attend<8, false>, nullptr, attend<10, false>, nullptr, attend<12, false>, nullptr, attend<14, false>,
     nullptr, attend<16, false>},
    {nullptr, nullptr, attend<2, true>, nullptr, attend<4, true>, nullptr, attend<6, true>, nullptr,
     attend<8, true>, nullptr, attend<10, true>, nullptr, attend<12, true>, nullptr, attend<14, true>,
     nullptr, attend<16, true>}};

// Sequences per thread below which each KV head is its own work item (so a small batch still
// spreads over every thread); above it a sequence's heads go together and stream whole blocks.
constexpr int64_t kSeqsPerThread = 4;

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: contiguous caches");
  // A sequence's heads must be dense; its rows may be strided (q as a view of the fused qkv
  // projection's output is read in place, not copied).
  if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2), q_row = q.stride(0);
  const int64_t hkv = k_cache.size(1), block_size = k_cache.size(2), group = hq / hkv;
  TORCH_CHECK(d % 32 == 0 && d <= 256 && group <= kMaxGroup && hq % hkv == 0 && block_size % 16 == 0,
              "decode_attention: head_dim must be a multiple of 32 up to 256, GQA group up to 16, blocks a "
              "multiple of 16 tokens");
  auto out = torch::empty({b, hq, d}, q.options());
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k_cache.data_ptr<bf16>(), *vp = v_cache.data_ptr<bf16>();
  const int64_t *tp = block_tables.data_ptr<int64_t>(), *lp = context_lens.data_ptr<int64_t>();
  const int64_t width = block_tables.size(1);
  bf16* op = out.data_ptr<bf16>();
  const AttendFn attend_fn = kAttend[g_prefetch == Prefetch::kL2Lines][d / 16];
  const int64_t per_item = b >= kSeqsPerThread * at::get_num_threads() ? hkv : 1, parts = hkv / per_item;
  parallel_items<Scratch>(b * parts, [&](Scratch& scratch, int64_t item, int64_t next) {
    const int64_t s = item / parts, h0 = item % parts * per_item;
    // Whole sequences: the next item is the next sequence, whose K the last blocks can prefetch.
    const bool next_seq = parts == 1 && next >= 0;
    attend_fn(qp + s * q_row + h0 * group * d, kp, vp, tp + s * width, lp[s], block_size, hkv, h0,
              h0 + per_item, group, static_cast<float>(scale), op + (s * hq + h0 * group) * d,
              next_seq ? tp + next * width : nullptr, next_seq ? lp[next] : 0, scratch, kBothPasses);
  });
  return out;
}

// 32 bits read and written over 16-bit storage (a dim pair of K).
typedef uint32_t __attribute__((may_alias)) u32_alias;

// r[i] lane j <- r[j] lane i, for 16 x 16 32-bit elements.
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now 128-bit lane k of r[4m + c] holds rows 4m..4m+3 of column 4k + c: transpose the 4 x 4 grid
  // of 128-bit lanes across r[c], r[c + 4], r[c + 8], r[c + 12].
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// KV blocks [..., 2, n, Hkv, block_size, D] (K at index 0 of the axis of 2, V at 1; contiguous),
// rewritten in place between plain rows and the caches' tiled layout. On the calling thread alone: a
// KV export or import runs off the engine thread, and an OpenMP team started there would slow every
// step (worker/engine_loop.py, load_engine).
void retile_kv(torch::Tensor blocks, bool to_tiled) {
  TORCH_CHECK(blocks.scalar_type() == at::kBFloat16 && blocks.is_contiguous() && blocks.dim() >= 5 &&
              blocks.size(-5) == 2, "retile_kv: contiguous bfloat16 blocks [..., 2, n, Hkv, block_size, D]");
  const int64_t d = blocks.size(-1), block_size = blocks.size(-2), tile = block_size * d;
  TORCH_CHECK(block_size % 16 == 0 && d % 2 == 0, "retile_kv: blocks of a multiple of 16 tokens, even head_dim");
  const int64_t per_half = blocks.size(-4) * blocks.size(-3);  // tiles of K (then of V) per leading index
  const int64_t tiles = tile ? blocks.numel() / tile : 0, pairs = d / 2;
  uint16_t* p = reinterpret_cast<uint16_t*>(blocks.data_ptr<bf16>());
  std::vector<uint16_t> copy(tile);
  // V's 32 dims of two rows a, b <-> two vectors of 16 dims, each dim's pair together.
  __m512i lo_idx, hi_idx, even_idx, odd_idx;
  {
    alignas(64) uint16_t lo[32], hi[32], even[32], odd[32];
    for (int i = 0; i < 32; ++i) {
      lo[i] = static_cast<uint16_t>(i % 2 * 32 + i / 2);
      hi[i] = static_cast<uint16_t>(i % 2 * 32 + 16 + i / 2);
      even[i] = static_cast<uint16_t>(2 * i);
      odd[i] = static_cast<uint16_t>(2 * i + 1);
    }
    lo_idx = _mm512_load_si512(lo), hi_idx = _mm512_load_si512(hi);
    even_idx = _mm512_load_si512(even), odd_idx = _mm512_load_si512(odd);
  }
  for (int64_t i = 0; i < tiles; ++i) {
    uint16_t* t = p + i * tile;
    std::copy(t, t + tile, copy.begin());
    const uint16_t* src = copy.data();
    if (i / per_half % 2 == 0) {  // K: a dim pair (32 bits) of 16 tokens together: 16 x 16 transposes
      const u32_alias* from = reinterpret_cast<const u32_alias*>(src);
      u32_alias* to = reinterpret_cast<u32_alias*>(t);
      for (int64_t sub = 0; sub < block_size / 16; ++sub, from += 16 * pairs, to += 16 * pairs) {
        // to_tiled reads rows of `pairs` (one per token) and writes rows of 16 (one per pair); back,
        // the other way round. Whole 16 x 16 squares in vectors, a tail of pairs one by one.
        const int64_t in_stride = to_tiled ? pairs : 16, out_stride = to_tiled ? 16 : pairs;
        int64_t pair = 0;
        for (; pair + 16 <= pairs; pair += 16) {
          __m512i r[16];
          for (int j = 0; j < 16; ++j)
            r[j] = _mm512_loadu_si512(to_tiled ? from + j * in_stride + pair : from + (pair + j) * in_stride);
          transpose16x16(r);
          for (int j = 0; j < 16; ++j)
            _mm512_storeu_si512(to_tiled ? to + (pair + j) * out_stride : to + j * out_stride + pair, r[j]);
        }
        for (; pair < pairs; ++pair)
          for (int64_t off = 0; off < 16; ++off) {
            if (to_tiled)
              to[pair * 16 + off] = from[off * pairs + pair];
            else
              to[off * pairs + pair] = from[pair * 16 + off];
          }
      }
    } else {  // V: two tokens' values of a dim together
      for (int64_t j = 0; j < block_size / 2; ++j) {
        int64_t dim = 0;
        for (; dim + 32 <= d; dim += 32) {
          uint16_t *a = t + 2 * j * d + dim, *b = a + d, *u = t + (j * d + dim) * 2;
          const uint16_t *sa = src + 2 * j * d + dim, *sb = sa + d, *su = src + (j * d + dim) * 2;
          if (to_tiled) {
            const __m512i va = _mm512_loadu_si512(sa), vb = _mm512_loadu_si512(sb);
            _mm512_storeu_si512(u, _mm512_permutex2var_epi16(va, lo_idx, vb));
            _mm512_storeu_si512(u + 32, _mm512_permutex2var_epi16(va, hi_idx, vb));
          } else {
            const __m512i u0 = _mm512_loadu_si512(su), u1 = _mm512_loadu_si512(su + 32);
            _mm512_storeu_si512(a, _mm512_permutex2var_epi16(u0, even_idx, u1));
            _mm512_storeu_si512(b, _mm512_permutex2var_epi16(u0, odd_idx, u1));
          }
        }
        for (; dim < d; ++dim)
          for (int64_t o = 0; o < 2; ++o) {
            if (to_tiled)
              t[(j * d + dim) * 2 + o] = src[(2 * j + o) * d + dim];
            else
              t[(2 * j + o) * d + dim] = src[(j * d + dim) * 2 + o];
          }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill attention of one prompt over itself (causal), in chunks of query rows: S = Q K^T into
// fp32 with K packed like a weight, a causal softmax written as bfloat16, then O = P V with V^T
// packed like a weight. Only the keys a chunk can see are touched.

constexpr int64_t kQueryChunk = 192;

// Row i of s (query position q0 + i) keeps keys 0..q0+i: softmax of scale * s into p (bf16, row
// stride ldp, zero past the causal limit up to width).
void causal_softmax(const float* s, int64_t rows, int64_t lds, int64_t q0, float scale, bf16* p,
                    int64_t ldp, int64_t width) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < rows; ++i) {
    const float* sr = s + i * lds;
    const int64_t n = q0 + i + 1;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16)
      vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(n - t), sr + t));
    const __m512 mx = _mm512_mul_ps(_mm512_set1_ps(_mm512_reduce_max_ps(vmx)), vscale);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 mask = tail_mask(n - t);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, sr + t), vscale, mx);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, exp512(x)));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t t = 0; t < width; t += 16) {
      const __mmask16 mask = tail_mask(std::min(n, width) - t), store = tail_mask(width - t);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, sr + t), vscale, mx);
      store_bf16x16(p + i * ldp + t, _mm512_maskz_mov_ps(mask, _mm512_mul_ps(exp512(x), inv)), store);
    }
  }
}

// Causal attention of len queries at positions prefix .. prefix + len - 1 over prefix + len keys: a
// whole prompt (prefix 0) or a later chunk of one whose earlier keys are cached (chunked prefill).
torch::Tensor prefix_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t prefix, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.dim() == 3, "prefix_attention: [tokens, heads, dim] bf16");
  const int64_t len = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1), group = hq / hkv;
  TORCH_CHECK(d % 64 == 0 && hq % hkv == 0, "prefix_attention: head_dim must be a multiple of 64");
  const int64_t nk = k.size(0);
  TORCH_CHECK(prefix >= 0 && nk == prefix + len && v.size(0) == nk, "prefix_attention: keys must be prefix + queries");
  // On AMX both products run on tiles: P V's K dimension (the keys) then comes in steps of 32, so the
  // keys are padded to a multiple of 32 (zero probabilities, zero V rows) instead of to even.
#if SPLITSERVE_AMX
  const bool amx = g_amx;
#else
  const bool amx = false;
#endif
  const int64_t key_step = amx ? 2 * kAmxPairs : 2;
  const int64_t nk_pad = (nk + key_step - 1) / key_step * key_step;
  // Per KV head: K as a packed [keys, d] weight, V^T as a packed [d, keys] weight (keys padded).
  std::vector<torch::Tensor> k_packed(hkv), v_packed(hkv);
  for (int64_t h = 0; h < hkv; ++h) {
    k_packed[h] = pack_weight(k.select(1, h));
    v_packed[h] = pack_weight(torch::constant_pad_nd(v.select(1, h), {0, 0, 0, nk_pad - nk}).t());
  }
  // [heads, tokens, d]: each head's rows dense, and kAmxRows rows past the last, which an AMX block
  // of the last head's last chunk reads (and does not store).
  auto qh = torch::empty({hq * len + kAmxRows, d}, q.options());
  qh.narrow(0, 0, hq * len).view({hq, len, d}).copy_(q.permute({1, 0, 2}));
  qh.narrow(0, hq * len, kAmxRows).zero_();
  auto out = torch::empty({len, hq, d}, q.options());
  const int64_t chunks = (len + kQueryChunk - 1) / kQueryChunk;
  const float sc = static_cast<float>(scale);
  bf16* op = out.data_ptr<bf16>();
  // Items (head, chunk) cost more the later the chunk; dynamic scheduling keeps threads even.
#pragma omp parallel num_threads(at::get_num_threads())
  {
#if SPLITSERVE_AMX
    if (amx) amx_configure();
#endif
    std::vector<float> s(kQueryChunk * nk_pad);
    std::vector<bf16> p(kQueryChunk * nk_pad);  // kQueryChunk is a multiple of kAmxRows
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < hq * chunks; ++item) {
      const int64_t h = item % hq, c = chunks - 1 - item / hq;  // largest chunks first
      const int64_t q0 = c * kQueryChunk, rows = std::min(kQueryChunk, len - q0), keys = prefix + q0 + rows;
      const int64_t keys_pad = (keys + key_step - 1) / key_step * key_step;
      const uint32_t* qx = reinterpret_cast<const uint32_t*>(qh.data_ptr<bf16>() + (h * len + q0) * d);
      const bf16* kp = k_packed[h / group].data_ptr<bf16>();
      const bf16* vp = v_packed[h / group].data_ptr<bf16>();
      const int64_t key_tiles = (keys + kTileN - 1) / kTileN;
      const uint32_t* px = reinterpret_cast<const uint32_t*>(p.data());
      std::vector<bf16> o(rows * d);
#if SPLITSERVE_AMX
      if (amx) {
        amx_rows<float>(qx, d / 2, rows, nullptr, 0, rows, kp, d / 2, d / 2, 0, key_tiles, keys, nullptr, s.data(),
                        nk_pad, false);
        causal_softmax(s.data(), rows, nk_pad, prefix + q0, sc, p.data(), nk_pad, keys_pad);
        amx_rows<bf16>(px, nk_pad / 2, rows, nullptr, 0, rows, vp, nk_pad / 2, keys_pad / 2, 0, d / kTileN, d,
                       nullptr, o.data(), d, false);
      }
#endif
      if (!amx) {
        gemm_rows<float>(qx, d / 2, 0, rows, kp, d / 2, d / 2, 0, key_tiles, keys, nullptr, s.data(), nk_pad);
        causal_softmax(s.data(), rows, nk_pad, prefix + q0, sc, p.data(), nk_pad, keys_pad);
        gemm_rows<bf16>(px, nk_pad / 2, 0, rows, vp, nk_pad / 2, keys_pad / 2, 0, d / kTileN, d, nullptr, o.data(), d);
      }
      for (int64_t r = 0; r < rows; ++r) std::copy(o.data() + r * d, o.data() + (r + 1) * d, op + ((q0 + r) * hq + h) * d);
    }
#if SPLITSERVE_AMX
    if (amx) amx_release();
#endif
  }
  return out;
}

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  return prefix_attention(q, k, v, 0, scale);
}

// ---------------------------------------------------------------------------------------------
// Element-wise ops, rounding to bfloat16 where transformers' bfloat16 modules round.

// Rows [r0, r1) of add_rmsnorm (rp, dp, np: [rows, h]; dp may be nullptr). 16 lanes at a time: the sum
// rounded to bfloat16 as torch's add is, the sum of squares in fp32 (in 16 partial sums), then
// weight * bfloat16(x * inv), rounded, as transformers' RMSNorm does.
void add_rmsnorm_rows(bf16* rp, const bf16* dp, const bf16* wp, bf16* np, int64_t h, double eps, int64_t r0,
                      int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    bf16* x = rp + r * h;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < h; i += 16) {
      const __mmask16 mask = tail_mask(h - i);
      __m512 v = maskz_load_bf16x16(mask, x + i);
      if (dp) {
        v = round_bf16x16(_mm512_add_ps(v, maskz_load_bf16x16(mask, dp + r * h + i)));
        store_bf16x16(x + i, v, mask);
      }
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / h + static_cast<float>(eps)));
    for (int64_t i = 0; i < h; i += 16) {
      const __mmask16 mask = tail_mask(h - i);
      const __m512 scaled = round_bf16x16(_mm512_mul_ps(maskz_load_bf16x16(mask, x + i), inv));
      store_bf16x16(np + r * h + i, _mm512_mul_ps(maskz_load_bf16x16(mask, wp + i), scaled), mask);
    }
  }
}

// residual += delta (when given); normed = weight * bf16(residual * rsqrt(mean(residual^2) + eps)).
torch::Tensor add_rmsnorm(torch::Tensor residual, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                          double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.scalar_type() == at::kBFloat16, "add_rmsnorm: input");
  const int64_t h = residual.size(-1), rows = residual.numel() / h;
  auto normed = torch::empty_like(residual);
  torch::Tensor dl = delta.has_value() ? delta->contiguous() : torch::Tensor();
  weight = weight.contiguous();
  bf16* rp = residual.data_ptr<bf16>();
  const bf16* dp = delta.has_value() ? dl.data_ptr<bf16>() : nullptr;
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* np = normed.data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { add_rmsnorm_rows(rp, dp, wp, np, h, eps, r0, r1); });
  return normed;
}

// Rows [r0, r1) of rope_write_kv: q, k and v rows q_row, k_row, v_row elements apart, heads dense;
// cos, sin [rows, d]; caches [num_blocks, hkv, block_size, d], tiled.
void rope_write_kv_rows(bf16* qp, int64_t q_row, bf16* kp, int64_t k_row, const bf16* vp, int64_t v_row, int64_t hq,
                        int64_t hkv, int64_t d, const bf16* cp, const bf16* sp, const int64_t* slot, bf16* kc,
                        bf16* vc, int64_t block_size, int64_t r0, int64_t r1) {
  const int64_t half = d / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  auto rotate = [&](bf16* x, const bf16* c, const bf16* s) {
    for (int64_t i = 0; i < half; i += 16) {
      const __mmask16 m = tail_mask(half - i);
      const __m512 x1 = maskz_load_bf16x16(m, x + i), x2 = maskz_load_bf16x16(m, x + i + half);
      const __m512 neg_x2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), sign));  // exact
      // x * cos + rotate_half(x) * sin, each product and the sum rounded like transformers' bf16 ops.
      const __m512 a = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x1, maskz_load_bf16x16(m, c + i))),
                                     round_bf16x16(_mm512_mul_ps(neg_x2, maskz_load_bf16x16(m, s + i))));
      const __m512 b = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x2, maskz_load_bf16x16(m, c + i + half))),
                                     round_bf16x16(_mm512_mul_ps(x1, maskz_load_bf16x16(m, s + i + half))));
      store_bf16x16(x + i, a, m);
      store_bf16x16(x + i + half, b, m);
    }
  };
  for (int64_t r = r0; r < r1; ++r) {
    const bf16 *c = cp + r * d, *s = sp + r * d;
    for (int64_t h = 0; h < hq; ++h) rotate(qp + r * q_row + h * d, c, s);
    const int64_t block = slot[r] / block_size, off = slot[r] % block_size;
    for (int64_t h = 0; h < hkv; ++h) {
      bf16* kr = kp + r * k_row + h * d;
      rotate(kr, c, s);
      const bf16* vr = vp + r * v_row + h * d;
      bf16 *kt = kc + (block * hkv + h) * block_size * d, *vt = vc + (block * hkv + h) * block_size * d;
      for (int64_t dim = 0; dim < d; ++dim) {  // the caches' tiled layout (see decode_attention)
        kt[tiled_k_offset(off, dim, d)] = kr[dim];
        vt[tiled_v_offset(off, dim, d)] = vr[dim];
      }
    }
  }
}

// Rotate q and k in place (rows may be strided; the last two dims are dense) and write k, v into
// the paged caches, in their tiled layout (see decode_attention), at the given slots.
void rope_write_kv(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  const int64_t t = q.size(0), hq = q.size(1), hkv = k.size(1), d = q.size(2);
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == d && k.stride(2) == 1 && k.stride(1) == d &&
              v.stride(2) == 1 && v.stride(1) == d, "rope_write_kv: heads must be dense");
  cos = cos.contiguous();
  sin = sin.contiguous();
  slots = slots.contiguous();
  const int64_t block_size = k_cache.size(2);  // caches are [num_blocks, Hkv, block_size, D], tiled
  TORCH_CHECK(block_size % 16 == 0, "rope_write_kv: blocks of a multiple of 16 tokens");
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    rope_write_kv_rows(q.data_ptr<bf16>(), q.stride(0), k.data_ptr<bf16>(), k.stride(0), v.data_ptr<bf16>(),
                       v.stride(0), hq, hkv, d, cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), slots.data_ptr<int64_t>(),
                       k_cache.data_ptr<bf16>(), v_cache.data_ptr<bf16>(), block_size, r0, r1);
  });
}

// Rows [r0, r1) of silu_mul: gp [rows, 2 * inter] -> op [rows, inter].
void silu_mul_rows(const bf16* gp, bf16* op, int64_t inter, int64_t r0, int64_t r1) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i = 0; i < inter; i += 16) {
      const __mmask16 mask = tail_mask(inter - i);
      const __m512 g = maskz_load_bf16x16(mask, gp + r * 2 * inter + i);
      const __m512 u = maskz_load_bf16x16(mask, gp + r * 2 * inter + inter + i);
      const __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), g);
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp512(neg)));
      store_bf16x16(op + r * inter + i, _mm512_mul_ps(round_bf16x16(silu), u), mask);
    }
}

// gate_up [T, 2I] -> bf16(silu(gate)) * up, rounded as transformers' bf16 MLP does.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  gate_up = gate_up.contiguous();
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: [T, 2I] gate and up");
  const int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({t, inter}, gate_up.options());
  const bf16* gp = gate_up.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, t, 4, [&](int64_t r0, int64_t r1) { silu_mul_rows(gp, op, inter, r0, r1); });
  return out;
}

inline __m512 maskz_load16(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 maskz_load16(__mmask16 mask, const bf16* p) { return maskz_load_bf16x16(mask, p); }

// Per row of logits [rows, vocab], float or bfloat16 (the model's dtype: widening is exact, so the
// answer is the same): the index of its first largest value, as torch's argmax gives it, or -1 when
// the row holds a NaN (which argmax would pick). One vector pass: each lane keeps its largest value
// and the first index that held it (a strictly greater value replaces it), in kArgmaxChains
// independent chains; the answer is the smallest index among the lanes holding the row's maximum.
constexpr int kArgmaxChains = 4;

template <typename T>
void argmax_rows_of(const T* xp, int64_t rows, int64_t n, int64_t* op) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* p = xp + r * n;
      __m512 best[kArgmaxChains];
      __m512i first[kArgmaxChains];
      for (int c = 0; c < kArgmaxChains; ++c) {
        best[c] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        first[c] = _mm512_setzero_si512();  // a row of -inf: index 0, as torch
      }
      __mmask16 nan = 0;
      int64_t i = 0;
      for (; i + 16 * kArgmaxChains <= n; i += 16 * kArgmaxChains)
        for (int c = 0; c < kArgmaxChains; ++c) {
          const __m512 v = maskz_load16(0xFFFF, p + i + 16 * c);
          nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          const __mmask16 gt = _mm512_cmp_ps_mask(v, best[c], _CMP_GT_OQ);
          best[c] = _mm512_mask_mov_ps(best[c], gt, v);
          first[c] = _mm512_mask_mov_epi32(first[c], gt, _mm512_add_epi32(_mm512_set1_epi32(int(i + 16 * c)), iota));
        }
      for (; i < n; i += 16) {  // the tail goes to chain 0, whose lanes saw only earlier indices
        const __mmask16 mask = tail_mask(n - i);
        const __m512 v = maskz_load16(mask, p + i);
        nan |= _mm512_mask_cmp_ps_mask(mask, v, v, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(mask, v, best[0], _CMP_GT_OQ);
        best[0] = _mm512_mask_mov_ps(best[0], gt, v);
        first[0] = _mm512_mask_mov_epi32(first[0], gt, _mm512_add_epi32(_mm512_set1_epi32(int(i)), iota));
      }
      if (nan) {
        op[r] = -1;
        continue;
      }
      __m512 top = best[0];
      for (int c = 1; c < kArgmaxChains; ++c) top = _mm512_max_ps(top, best[c]);
      top = _mm512_set1_ps(_mm512_reduce_max_ps(top));
      __m512i found = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
      for (int c = 0; c < kArgmaxChains; ++c)
        found = _mm512_mask_min_epi32(found, _mm512_cmp_ps_mask(best[c], top, _CMP_EQ_OQ), found, first[c]);
      op[r] = _mm512_reduce_min_epi32(found);
    }
  });
}

torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "argmax_rows: 2-D float or bfloat16 logits");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: an empty row has no argmax");
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(), "argmax_rows: a row too long");
  const auto x = logits.contiguous();
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kFloat)
    argmax_rows_of(x.data_ptr<float>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  else
    argmax_rows_of(x.data_ptr<bf16>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  return out;
}

// ---------------------------------------------------------------------------------------------
// The pipelined decode step (DecodeLayers::run_pipelined): whether it runs (set from Python by CPU:
// kernels/__init__.py), and from how many sequences and how much K and V read, against the layers'
// weights, which it reads twice. Below either it was slower on AMD's Zen 4 (docs/benchmarks.md):
// with fewer rows the GEMMs stream their weights instead of computing, and with less attention there
// is less to hide than the second read of the weights costs (SmolLM2-135M: 16,128 tokens of context).
bool g_pipeline = false;
constexpr int64_t kPipelineSeqs = 16;
constexpr double kPipelineKvOverWeights = 1.75;
// Steps run pipelined, and attention passes run between GEMM tiles (the rest wait for their phase's
// GEMMs to end), for tests and A/B scripts.
std::atomic<int64_t> g_pipelined_steps{0}, g_overlapped_passes{0};
void set_decode_pipeline(bool on) { g_pipeline = on; }
bool decode_pipeline() { return g_pipeline; }
int64_t pipelined_steps() { return g_pipelined_steps.load(); }
int64_t overlapped_passes() { return g_overlapped_passes.load(); }

// One GEMM's tiles for one thread of a pipelined step: [next, end), taken one at a time by their
// owner or, once the owner has opened them, by a thread done with its own.
struct alignas(64) TileRun {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
  std::atomic<bool> open{false};
};

// ---------------------------------------------------------------------------------------------
// Every decoder layer of a decode step in one call: the same kernels, in the same order and on
// the same views as the model's Python forward (models/llama.py), so the same bits, without ~25 us
// of Python per layer (~0.8 ms a step, a tenth of a batch-1 step) and with the GIL let go once for
// the whole pass instead of taken back after each of ~300 kernels (a worker's event loop thread
// then waits for none of them); larger steps pipelined (run_pipelined: the same arithmetic on every
// row in another order, so the same bits too). Holds references to the packed weights, the norms'
// weights and the cache's layer views, taken once per KV cache.
struct DecodeLayers {
  std::vector<torch::Tensor> qkv, qkv_bias, o, gate_up, down, post_norm, next_norm, k_cache, v_cache;
  int64_t heads, kv_heads, head_dim, hidden, intermediate;
  double eps, scale;
  // What run_pipelined reads of each layer, as pointers: taken once, by the constructor, since nothing
  // in its OpenMP region may throw (the tensors above hold them; the QKV bias here, in fp32).
  struct Packed {
    const bf16* p;
    int64_t tiles, k2;
  };
  struct Layer {
    Packed qkv, o, gate_up, down;
    const float* qkv_bias;
    const bf16 *post_norm, *next_norm;
    bf16 *kc, *vc;
  };
  std::vector<Layer> pipeline_layers;  // empty where run_pipelined does not take these layers
  std::vector<torch::Tensor> qkv_bias_f32;
  int64_t weight_bytes = 0;  // of every layer's packed weights

  DecodeLayers(std::vector<torch::Tensor> qkv, std::vector<torch::Tensor> qkv_bias, std::vector<torch::Tensor> o,
               std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down,
               std::vector<torch::Tensor> post_norm, std::vector<torch::Tensor> next_norm,
               std::vector<torch::Tensor> k_cache, std::vector<torch::Tensor> v_cache, int64_t heads,
               int64_t kv_heads, int64_t head_dim, int64_t hidden, int64_t intermediate, double eps, double scale)
      : qkv(std::move(qkv)), qkv_bias(std::move(qkv_bias)), o(std::move(o)), gate_up(std::move(gate_up)),
        down(std::move(down)), post_norm(std::move(post_norm)), next_norm(std::move(next_norm)),
        k_cache(std::move(k_cache)), v_cache(std::move(v_cache)), heads(heads), kv_heads(kv_heads),
        head_dim(head_dim), hidden(hidden), intermediate(intermediate), eps(eps), scale(scale) {
    const size_t n = this->qkv.size();
    TORCH_CHECK(n > 0 && this->qkv_bias.size() == n && this->o.size() == n && this->gate_up.size() == n &&
                this->down.size() == n && this->post_norm.size() == n && this->next_norm.size() == n &&
                this->k_cache.size() == n && this->v_cache.size() == n, "DecodeLayers: one entry per layer");
    if (fits_pipeline()) take_pipeline_layers();
  }

  // Whether run_pipelined takes these layers, whose shapes its region does not check (nothing in it
  // may throw): head dims the attention takes (a multiple of 32 up to 256, GQA groups up to 16), even
  // GEMM widths (gemm_rows loads row pairs) matching the packed weights, blocks of a multiple of 16
  // tokens, and contiguous caches and norm weights.
  bool fits_pipeline() {
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    if (head_dim % 32 || head_dim > 256 || kv_heads < 1 || heads % kv_heads || heads / kv_heads > kMaxGroup ||
        q_size % 2 || hidden % 2 || intermediate % 2)
      return false;
    auto packs = [](const torch::Tensor& w, int64_t k, int64_t n) {
      return w.dim() == 4 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && 2 * w.size(1) == k &&
             w.size(0) * kTileN >= n;
    };
    for (size_t i = 0; i < qkv.size(); ++i) {
      if (!packs(qkv[i], hidden, q_size + 2 * kv_size) || !packs(o[i], q_size, hidden) ||
          !packs(gate_up[i], hidden, 2 * intermediate) || !packs(down[i], intermediate, hidden))
        return false;
      for (const auto* t : {&k_cache[i], &v_cache[i], &post_norm[i], &next_norm[i]})
        if (!t->is_contiguous() || t->scalar_type() != at::kBFloat16) return false;
      if (k_cache[i].dim() != 4 || k_cache[i].size(1) != kv_heads || k_cache[i].size(2) % 16 ||
          k_cache[i].size(3) != head_dim || !v_cache[i].sizes().equals(k_cache[i].sizes()))
        return false;
    }
    return true;
  }

  void take_pipeline_layers() {
    auto packed = [](const torch::Tensor& w) { return Packed{w.data_ptr<bf16>(), w.size(0), w.size(1)}; };
    qkv_bias_f32.resize(qkv.size());
    for (size_t i = 0; i < qkv.size(); ++i) {
      if (qkv_bias[i].defined() && qkv_bias[i].numel() > 0) qkv_bias_f32[i] = qkv_bias[i].to(at::kFloat).contiguous();
      pipeline_layers.push_back(Layer{packed(qkv[i]), packed(o[i]), packed(gate_up[i]), packed(down[i]),
                                      qkv_bias_f32[i].defined() ? qkv_bias_f32[i].data_ptr<float>() : nullptr,
                                      post_norm[i].data_ptr<bf16>(), next_norm[i].data_ptr<bf16>(),
                                      k_cache[i].data_ptr<bf16>(), v_cache[i].data_ptr<bf16>()});
      for (const auto* w : {&qkv[i], &o[i], &gate_up[i], &down[i]}) weight_bytes += w->numel() * w->element_size();
    }
  }

  // residual [B, hidden] (updated in place) and its input-normed copy for layer 0; cos/sin
  // [B, head_dim]; returns the last layer's output normed by the final norm.
  torch::Tensor run(torch::Tensor residual, torch::Tensor normed, torch::Tensor cos, torch::Tensor sin,
                    torch::Tensor slots, torch::Tensor block_tables, torch::Tensor context_lens) const {
    if (pipelines(residual, normed, cos, sin, slots, block_tables, context_lens))
      return run_pipelined(residual, normed, cos, sin, slots, block_tables, context_lens);
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    for (size_t i = 0; i < qkv.size(); ++i) {
      c10::optional<torch::Tensor> bias;
      if (qkv_bias[i].defined() && qkv_bias[i].numel() > 0) bias = qkv_bias[i];
      auto fused = gemm(normed, qkv[i], q_size + 2 * kv_size, bias);
      auto q = fused.narrow(1, 0, q_size).view({-1, heads, head_dim});
      auto k = fused.narrow(1, q_size, kv_size).view({-1, kv_heads, head_dim});
      auto v = fused.narrow(1, q_size + kv_size, kv_size).view({-1, kv_heads, head_dim});
      rope_write_kv(q, k, v, cos, sin, k_cache[i], v_cache[i], slots);
      auto attn = decode_attention(q, k_cache[i], v_cache[i], block_tables, context_lens, scale);
      normed = add_rmsnorm(residual, gemm(attn.reshape({-1, q_size}), o[i], hidden, c10::nullopt), post_norm[i], eps);
      auto act = silu_mul(gemm(normed, gate_up[i], 2 * intermediate, c10::nullopt));
      normed = add_rmsnorm(residual, gemm(act, down[i], hidden, c10::nullopt), next_norm[i], eps);
    }
    return normed;
  }

  // Whether a step runs pipelined (run_pipelined): on AVX512 (AMX sums in another order), layers it
  // takes (fits_pipeline), at least kPipelineSeqs sequences whose K and V come to
  // kPipelineKvOverWeights times the layers' weights, and contiguous inputs of the types it reads. On
  // one thread as on two: a core computing a GEMM tile streams the next attention pass meanwhile.
  bool pipelines(const torch::Tensor& residual, const torch::Tensor& normed, const torch::Tensor& cos,
                 const torch::Tensor& sin, const torch::Tensor& slots, const torch::Tensor& block_tables,
                 const torch::Tensor& context_lens) const {
    const int64_t b = residual.size(0);
    if (!g_pipeline || g_amx || pipeline_layers.empty() || b < kPipelineSeqs) return false;
    if (residual.dim() != 2 || residual.size(1) != hidden || !residual.is_contiguous() ||
        residual.scalar_type() != at::kBFloat16 || !normed.sizes().equals(residual.sizes()) ||
        normed.scalar_type() != at::kBFloat16 || cos.scalar_type() != at::kBFloat16 ||
        sin.scalar_type() != at::kBFloat16 || cos.numel() != b * head_dim || sin.numel() != b * head_dim ||
        slots.scalar_type() != at::kLong || slots.numel() != b || block_tables.scalar_type() != at::kLong ||
        block_tables.dim() != 2 || block_tables.size(0) != b || !block_tables.is_contiguous() ||
        context_lens.scalar_type() != at::kLong || context_lens.numel() != b || !context_lens.is_contiguous())
      return false;
    const int64_t kv_bytes_per_token = static_cast<int64_t>(qkv.size()) * 2 * kv_heads * head_dim * 2;
    return static_cast<double>(context_lens.sum().item<int64_t>() * kv_bytes_per_token) >=
           kPipelineKvOverWeights * static_cast<double>(weight_bytes);
  }

  // The same layers, the same kernels' arithmetic and so the same bits as run's, in one OpenMP region
  // for the whole step, with the batch in two halves a half-layer apart: while the threads run one
  // half's GEMMs and element-wise ops (its O projection and MLP of one layer, then its QKV of the
  // next), they run the other half's decode attention, whose K and V the GEMMs prefetch into L2 ahead
  // of it (PassQueue). The attention, bound by memory, then overlaps the GEMMs, bound by compute,
  // instead of taking its turn after them. Each half reads every layer's weights, so they are read
  // twice a step.
  torch::Tensor run_pipelined(torch::Tensor residual, torch::Tensor normed, torch::Tensor cos, torch::Tensor sin,
                              torch::Tensor slots, torch::Tensor block_tables, torch::Tensor context_lens) const {
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_n = q_size + 2 * kv_size;
    const int64_t b = residual.size(0), half = b / 2, layers = static_cast<int64_t>(qkv.size());
    const int64_t group = heads / kv_heads, block_size = k_cache[0].size(2), width = block_tables.size(1);
    auto options = residual.options();
    auto normed_out = normed.contiguous().clone();
    auto fused = torch::empty({b, qkv_n}, options), attn = torch::empty({b, heads, head_dim}, options);
    auto delta = torch::empty({b, hidden}, options), gate_up_out = torch::empty({b, 2 * intermediate}, options);
    auto act = torch::empty({b, intermediate}, options);
    cos = cos.contiguous();
    sin = sin.contiguous();
    slots = slots.contiguous();
    // Every pointer the region reads, taken before it: nothing in it may throw.
    const std::vector<Layer>& ls = pipeline_layers;
    const bf16 *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    bf16 *rp = residual.data_ptr<bf16>(), *np = normed_out.data_ptr<bf16>(), *fp = fused.data_ptr<bf16>();
    bf16 *ap = attn.data_ptr<bf16>(), *dp = delta.data_ptr<bf16>(), *gp = gate_up_out.data_ptr<bf16>();
    bf16* xp = act.data_ptr<bf16>();
    const int64_t *tp = block_tables.data_ptr<int64_t>(), *lp = context_lens.data_ptr<int64_t>();
    const int64_t max_ctx = context_lens.max().item<int64_t>();
    const AttendFn attend_fn = kAttend[g_prefetch == Prefetch::kL2Lines][head_dim / 16];
    const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), half));
    // Each thread's scratch at its largest before the region, which then allocates nothing.
    std::vector<Scratch> scratches(threads);
    for (auto& sc : scratches) {
      sc.scores.reserve(heads * max_ctx);
      sc.probs.reserve(heads * (max_ctx + 1));
      sc.acc.reserve(heads * head_dim);
      sc.inv_sum.reserve(heads);
    }
    const float scale_f = static_cast<float>(scale);
    // Each GEMM's tiles, a run per thread; a thread done with its own takes what is left of the others'.
    std::vector<TileRun> tile_runs(static_cast<size_t>(8 * layers + 8) * threads);
    g_pipelined_steps.fetch_add(1);
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      Scratch& scratch = scratches[t];
      int64_t overlapped = 0;
      auto share = [&](int64_t r0, int64_t r1, int64_t& s0, int64_t& s1) {
        s0 = r0 + (r1 - r0) * t / nt;
        s1 = r0 + (r1 - r0) * (t + 1) / nt;
      };
      auto run_pass = [&](PassQueue& pq, int64_t layer) {
        const int64_t s = pq.seq(pq.done);
        attend_fn(fp + s * qkv_n, ls[layer].kc, ls[layer].vc, tp + s * width, lp[s], block_size, kv_heads, 0,
                  kv_heads, group, scale_f, ap + s * q_size, nullptr, 0, scratch,
                  pq.done % 2 ? kValuesPass : kLogitsPass);
        pq.pass_done();
      };
      // out[r0:r1] = x[r0:r1] @ W^T (+ bias), W's tiles shared out (TileRun); after each tile, the
      // attention passes its prefetch has brought in.
      int64_t op = 0;  // this thread's count of GEMMs begun: every thread runs the same ones in turn
      auto gemm_part = [&](const bf16* x, const Packed& w, int64_t n, const float* bias, bf16* out, int64_t r0,
                           int64_t r1, PassQueue* pq, int64_t layer) {
        int64_t t0, t1;
        share(0, w.tiles, t0, t1);
        TileRun* runs = tile_runs.data() + op++ * nt;
        runs[t].next.store(t0, std::memory_order_relaxed);
        runs[t].end = t1;
        runs[t].open.store(true, std::memory_order_release);
        const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);
        for (int k = 0; k < nt; ++k) {
          TileRun& run = runs[(t + k) % nt];
          if (!run.open.load(std::memory_order_acquire)) continue;  // its owner has not begun
          for (int64_t j; (j = run.next.fetch_add(1, std::memory_order_relaxed)) < run.end;) {
            const bf16* after = j + 1 < run.end ? w.p + (j + 1) * w.k2 * kTileN * 2 : nullptr;
            gemm_rows<bf16>(x32, w.k2, r0, r1, w.p, w.k2, w.k2, j, j + 1, n, bias, out, n, true, after, pq);
            for (; pq && pq->ready(); ++overlapped) run_pass(*pq, layer);
          }
        }
      };
      // Layer i's O projection and MLP over rows [r0, r1): residual += O(attn), normed = post norm;
      // residual += down(silu(gate_up(normed))), normed = the next layer's input norm (or the final).
      auto tail = [&](int64_t i, int64_t r0, int64_t r1, PassQueue* pq, int64_t layer) {
        int64_t s0, s1;
        share(r0, r1, s0, s1);
        gemm_part(ap, ls[i].o, hidden, nullptr, dp, r0, r1, pq, layer);
#pragma omp barrier
        add_rmsnorm_rows(rp, dp, ls[i].post_norm, np, hidden, eps, s0, s1);
#pragma omp barrier
        gemm_part(np, ls[i].gate_up, 2 * intermediate, nullptr, gp, r0, r1, pq, layer);
#pragma omp barrier
        silu_mul_rows(gp, xp, intermediate, s0, s1);
#pragma omp barrier
        gemm_part(xp, ls[i].down, hidden, nullptr, dp, r0, r1, pq, layer);
#pragma omp barrier
        add_rmsnorm_rows(rp, dp, ls[i].next_norm, np, hidden, eps, s0, s1);
#pragma omp barrier
      };
      // Layer i's QKV projection over rows [r0, r1), RoPE, and their K and V written to its caches.
      auto head = [&](int64_t i, int64_t r0, int64_t r1, PassQueue* pq, int64_t layer) {
        int64_t s0, s1;
        share(r0, r1, s0, s1);
        gemm_part(np, ls[i].qkv, qkv_n, ls[i].qkv_bias, fp, r0, r1, pq, layer);
#pragma omp barrier
        rope_write_kv_rows(fp, qkv_n, fp + q_size, qkv_n, fp + q_size + kv_size, qkv_n, heads, kv_heads, head_dim,
                           cp, sp, slot, ls[i].kc, ls[i].vc, block_size, s0, s1);
#pragma omp barrier
      };
      // Layer i's attention over sequences [r0, r1), this thread's share, as a queue of passes.
      auto queue = [&](int64_t i, int64_t r0, int64_t r1) {
        PassQueue pq;
        int64_t s0, s1;
        share(r0, r1, s0, s1);
        pq.kc = ls[i].kc;
        pq.vc = ls[i].vc;
        pq.tables = tp;
        pq.lens = lp;
        pq.width = width;
        pq.block_size = block_size;
        pq.block_elems = kv_heads * block_size * head_dim;
        pq.first = s0;
        pq.passes = 2 * (s1 - s0);
        return pq;
      };
      auto finish = [&](PassQueue& pq, int64_t layer) {
        while (pq.done < pq.passes) run_pass(pq, layer);
#pragma omp barrier
      };
      // Half A is rows [0, half), B [half, b). A's QKV of layer 0 first; then per layer, A's attention
      // beside B's previous layer's tail and this layer's head, and B's attention beside A's tail and
      // next head; B's last tail at the end.
      head(0, 0, half, nullptr, 0);
      for (int64_t i = 0; i < layers; ++i) {
        PassQueue pa = queue(i, 0, half);
        if (i > 0) tail(i - 1, half, b, &pa, i);
        head(i, half, b, &pa, i);
        finish(pa, i);
        PassQueue pb = queue(i, half, b);
        tail(i, 0, half, &pb, i);
        if (i + 1 < layers) head(i + 1, 0, half, &pb, i);
        finish(pb, i);
      }
      tail(layers - 1, half, b, nullptr, 0);
      g_overlapped_passes.fetch_add(overlapped, std::memory_order_relaxed);
    }
    return normed_out;
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The compute kernels touch no Python object, so they let go of the GIL while they run, as torch's
  // own operators do: a worker's event loop thread runs beside its engine thread's step instead of
  // waiting for it between operations (and holding up the next one when it gets the GIL).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("pack_weight", &pack_weight, "pack a [N, K] bf16 weight into [N/64, K/2, 64, 2] tiles", nogil);
  m.def("gemm", &gemm, "x @ W^T (+ bias) with a packed weight", nogil);
  m.def("amx_enable", &amx_enable, "ask Linux for AMX tile state; true if granted (GEMMs then use AMX)");
  m.def("amx_enabled", &amx_enabled, "whether GEMMs and prefill attention use AMX");
  m.def("set_amx", &set_amx, "turn the AMX path on or off (on only where amx_enable succeeded)");
  m.def("decode_attention", &decode_attention, "paged attention over tiled caches, one query token per sequence",
        nogil);
  m.def("retile_kv", &retile_kv, "rewrite KV blocks [..., 2, n, Hkv, block_size, D] in place between plain rows "
        "(to_tiled=False) and the caches' tiled layout", nogil);
  m.def("set_attention_prefetch", &set_attention_prefetch,
        "how the decode attention prefetches K and V: l2 (a block at a time into L2, the default), l1 (the "
        "same into L1) or l2-lines (into L2, a line for each line read)");
  m.def("attention_prefetch", &attention_prefetch, "how the decode attention prefetches (l2, l1 or l2-lines)");
  m.def("prefill_attention", &prefill_attention, "causal attention of one prompt over itself", nogil);
  m.def("prefix_attention", &prefix_attention,
        "causal attention of a prompt chunk over its cached prefix and itself", nogil);
  m.def("add_rmsnorm", &add_rmsnorm, "residual += delta in place; returns the RMS-normed residual", nogil);
  m.def("rope_write_kv", &rope_write_kv, "RoPE on q and k in place; k and v written to the caches", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up", nogil);
  py::class_<DecodeLayers>(m, "DecodeLayers", "every decoder layer of a decode step in one call")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>, int64_t,
                    int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("run", &DecodeLayers::run, "the layers over one decode batch; returns the final-normed hidden states",
           nogil);
  m.def("set_decode_pipeline", &set_decode_pipeline,
        "run DecodeLayers' larger steps pipelined (the attention beside the GEMMs) or not");
  m.def("decode_pipeline", &decode_pipeline, "whether DecodeLayers' larger steps run pipelined");
  m.def("pipelined_steps", &pipelined_steps, "how many decode steps this process has run pipelined");
  m.def("overlapped_passes", &overlapped_passes,
        "how many attention passes this process's pipelined steps ran between GEMM tiles");
  m.def("argmax_rows", &argmax_rows, "each row's first argmax, -1 for a row holding a NaN", nogil);
}
