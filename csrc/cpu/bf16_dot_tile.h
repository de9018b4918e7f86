// bf16 dot-product tiles shared by the skinny GEMM (linear.cpp) and the grouped GEMM's NT
// form (grouped_gemm.cpp): c[m x nr] = a rows [m, k] . weight rows [nr, k], both row-major
// with stride k, AVX512-BF16 dot products accumulated in float32, rounded to bf16 once.
// Include only where __AVX512BF16__ is defined.
#pragma once

#include <algorithm>
#include <cstdint>

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu_dtype.h"

namespace qwen3_fast::cpu::bf16_tile {

constexpr int kNR = 4;  // weight rows per micro-tile of the default (4 x 4) shape
constexpr int kMR = 4;  // activation rows per micro-tile: 16 accumulators + 4 + 1 zmm live

inline __m512bh load_bh(const bf16* p, __mmask32 mask) {
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, p));
}

// y[MR x nr] = x rows [MR, k] . weight rows w[0..nr) (stride k), nr <= NR.
template <int MR, int NR = kNR>
void micro_tile(const bf16* x, const bf16* w, int nr, std::int64_t k, bf16* y,
                std::int64_t ldy) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const bf16* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + std::min(j, nr - 1) * k;  // repeat the last row
  // acc must live in registers: the unroll pragmas (and one loop with the tail mask per
  // step) make GCC scalarize it; without them it kept acc on the stack and stored every
  // accumulator every k step (3x slower at m=8).
  for (std::int64_t k0 = 0; k0 < k; k0 += 32) {
    const std::int64_t left = k - k0;
    const __mmask32 mask = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1u);
    __m512bh bv[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) bv[j] = load_bh(wr[j] + k0, mask);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = load_bh(x + i * k + k0, mask);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  // Reduce all NR accumulators (constant bounds: indexing acc by the runtime nr would
  // also pin it to the stack), then write the nr real columns.
  float sums[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) y[i * ldy + j] = from_float<bf16>(sums[i][j]);
}

// All m rows against weight rows w[0..nr), nr <= kNR: the weight tile (nr * k * 2 bytes)
// comes from memory on the first row group and from L1/L2 for the others. Row groups of
// kMR rows keep kMR * kNR = 16 accumulators.
inline void tile_all_rows(const bf16* x, std::int64_t m, const bf16* w, int nr,
                          std::int64_t k, bf16* y, std::int64_t ldy) {
  std::int64_t r = 0;
  for (; r + kMR <= m; r += kMR) micro_tile<kMR>(x + r * k, w, nr, k, y + r * ldy, ldy);
  switch (m - r) {
    case 3: micro_tile<3>(x + r * k, w, nr, k, y + r * ldy, ldy); break;
    case 2: micro_tile<2>(x + r * k, w, nr, k, y + r * ldy, ldy); break;
    case 1: micro_tile<1>(x + r * k, w, nr, k, y + r * ldy, ldy); break;
    default: break;
  }
}

}  // namespace qwen3_fast::cpu::bf16_tile
