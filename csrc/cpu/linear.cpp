// Skinny bfloat16 linear on the CPU: y[m, n] = x[m, k] @ w[n, k]^T for 1 <= m <= 16 rows
// (decode: one to a few tokens), x, w, y row-major and contiguous, float32 accumulation,
// one rounding to bfloat16 (nearest even) per output, like torch's bf16 matmul.
//
// Why not torch.nn.functional.linear (what ops/linear.py uses for every other case): at
// m <= 8 rows torch's bf16 GEMM reads the weight at ~3.3 GB/s per thread here, a few
// percent of what the memory can deliver, and decode is nothing but weight reads. Here
// each thread owns a static slice of weight rows and streams it from memory exactly once,
// applying every weight row to all m activation rows while it is in cache (bytes moved ~
// n*k*2 whatever m is). c[i][j] is a dot product along k: 16 float32 lanes of vdpbf16ps
// (32 bf16 products each) and one horizontal add per output at the end. A k tail (any k,
// odd too) is a masked load whose missing lanes are zero.
#include <algorithm>
#include <string>
#include <vector>

#include "cpu_math.h"
#include "kernels.h"

#if defined(__AVX512BF16__)
#include "bf16_dot_tile.h"
#endif

namespace qwen3_fast::cpu {

namespace {

constexpr std::int64_t kMaxRows = 16;

#if defined(__AVX512BF16__)
using bf16_tile::kNR;

// y = x @ w^T with kNR-row weight tiles; static schedule: each thread streams one
// contiguous slice of weight rows, once, in order.
void linear_tiles(const bf16* xp, const bf16* wp, bf16* yp, std::int64_t m, std::int64_t n,
                  std::int64_t k, int num_threads) {
  const std::int64_t tiles = (n + kNR - 1) / kNR;
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
  for (std::int64_t t = 0; t < tiles; ++t) {
    const std::int64_t j0 = t * kNR;
    const int nr = static_cast<int>(std::min<std::int64_t>(kNR, n - j0));
    bf16_tile::tile_all_rows(xp, m, wp + j0 * k, nr, k, yp + j0, n);
  }
}

// y[M rows, n] for 1 <= M <= 8: each thread walks its slice of weight rows one row after
// the other, so it reads one sequential stream (the hardware prefetcher's best case), and
// applies each 32-element weight chunk to all M activation rows (L1-resident); C independent
// accumulator chains per activation row along k (M * C <= 16 registers) hide the dpbf16
// latency. Streaming two to four weight rows at once (reusing each x load) was slower at
// every M on this VM (side by side, [3072 x 1024], 2 threads, 2026-11-30: at M = 8 the
// single stream took 406 us, 2 rows 592 us, 3 rows 515 us, 4 x 4 tiles 547 us). Callers
// keep M * k small enough for x to stay in L1 (linear_bf16).
template <int M, int C = (M <= 4 ? 4 : 2)>
void linear_rows(const bf16* xp, const bf16* wp, bf16* yp, std::int64_t n, std::int64_t k,
                 int num_threads) {
  using bf16_tile::load_bh;
  constexpr __mmask32 kAll = ~__mmask32{0};
  constexpr std::int64_t kStep = 32 * C;
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
  for (std::int64_t j = 0; j < n; ++j) {
    const bf16* w = wp + j * k;
    __m512 acc[M][C];
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
    std::int64_t k0 = 0;
    for (; k0 + kStep <= k; k0 += kStep) {
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const __m512bh wv = load_bh(w + k0 + 32 * c, kAll);
#pragma GCC unroll 16
        for (int i = 0; i < M; ++i)
          acc[i][c] = _mm512_dpbf16_ps(acc[i][c], load_bh(xp + i * k + k0 + 32 * c, kAll), wv);
      }
    }
    for (; k0 < k; k0 += 32) {  // tail: 32 at a time, the last one masked
      const std::int64_t left = k - k0;
      const __mmask32 mask = left >= 32 ? kAll : static_cast<__mmask32>((1u << left) - 1u);
      const __m512bh wv = load_bh(w + k0, mask);
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i)
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], load_bh(xp + i * k + k0, mask), wv);
    }
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      __m512 s = acc[i][0];
#pragma GCC unroll 4
      for (int c = 1; c < C; ++c) s = _mm512_add_ps(s, acc[i][c]);
      yp[i * n + j] = from_float<bf16>(_mm512_reduce_add_ps(s));
    }
  }
}
#endif

}  // namespace

void linear_bf16(ptr x, ptr w, ptr y, std::int64_t m, std::int64_t n, std::int64_t k,
                 int num_threads) {
  check_arg(m >= 1 && m <= kMaxRows, "linear: rows m must be in [1, 16], got " + std::to_string(m));
  check_arg(n > 0, "linear: out_features n must be > 0, got " + std::to_string(n));
  check_arg(k > 0, "linear: in_features k must be > 0, got " + std::to_string(k));
  check_ptr(x, "x"); check_ptr(w, "weight"); check_ptr(y, "y");
  const bf16* xp = reinterpret_cast<const bf16*>(x);
  const bf16* wp = reinterpret_cast<const bf16*>(w);
  bf16* yp = reinterpret_cast<bf16*>(y);
#if defined(__AVX512BF16__)
  // One or two rows (decode at batch 1-2), and up to 8 rows when k <= 1024: one weight row
  // after the other, a single sequential stream per thread. Measured side by side on
  // Qwen3's [151936 x 1024] LM head at m = 1 (2 threads, 2026-11-29): 23 GB/s, 92% of a
  // plain AVX-512 read of the same bytes (25 GB/s that hour), against 20 GB/s for 16-row
  // tiles (16 interleaved streams). At 3-8 rows (2026-11-30, same binary, interleaved runs)
  // rows beat the 4 x 4 tiles 1.17-1.74x at k = 1024 ([3072 x 1024], the LM head) but lose
  // 0.6-0.8x at k = 2048-3072, where the m x k activations (24-48 KB) no longer sit in L1
  // and every weight chunk re-reads them from L2; the tiles, which reuse each weight load
  // for 4 rows and each x load for 4 weight rows, take those and everything from 9 rows.
  if (m <= 2 || k <= 1024) {
    switch (m) {
      case 1: linear_rows<1>(xp, wp, yp, n, k, num_threads); return;
      case 2: linear_rows<2>(xp, wp, yp, n, k, num_threads); return;
      case 3: linear_rows<3>(xp, wp, yp, n, k, num_threads); return;
      case 4: linear_rows<4>(xp, wp, yp, n, k, num_threads); return;
      case 5: linear_rows<5>(xp, wp, yp, n, k, num_threads); return;
      case 6: linear_rows<6>(xp, wp, yp, n, k, num_threads); return;
      case 7: linear_rows<7>(xp, wp, yp, n, k, num_threads); return;
      case 8: linear_rows<8>(xp, wp, yp, n, k, num_threads); return;
      default: break;
    }
  }
  linear_tiles(xp, wp, yp, m, n, k, num_threads);
#else
  // Portable path: x converted to float32 once, then per weight row a float dot product
  // against every x row (the weight row is read from memory once and reused from cache).
  std::vector<float> xf(static_cast<std::size_t>(m * k));
  for (std::int64_t i = 0; i < m * k; ++i) xf[i] = to_float(xp[i]);
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
  for (std::int64_t j = 0; j < n; ++j) {
    const bf16* wr = wp + j * k;
    for (std::int64_t i = 0; i < m; ++i) {
      const float* xr = xf.data() + i * k;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (std::int64_t kk = 0; kk < k; ++kk) acc += xr[kk] * to_float(wr[kk]);
      yp[i * n + j] = from_float<bf16>(acc);
    }
  }
#endif
}

}  // namespace qwen3_fast::cpu
