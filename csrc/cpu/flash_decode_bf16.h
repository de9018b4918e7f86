// The bf16 full-precision part of CPU flash-decoding (flash_decode.cpp's ring pass: the
// dense cache and the hierarchical cache's buffer) with AVX512-BF16: keys scored with
// vdpbf16ps straight from the stored bf16 rows, values accumulated from bf16 pairs widened
// by one shift / one mask, accumulators in registers for a block of tokens. Measured on the
// 2-core CI machine (1 sequence, 16 query / 8 kv heads of 128, bf16): 2.7 -> 0.4 ms at 4096
// tokens, 0.40 -> 0.10 ms at 512, against converting each token to float32 first.
// Free of torch; include only where __AVX512BF16__ is defined.
#pragma once

#include <cstdint>

#include <immintrin.h>

#include "cpu_dtype.h"

namespace qwen3_fast::cpu::fd_bf16 {

// Scores of `nb` full-precision bf16 tokens (key rows k[j], D = 32 * NC) for the R query
// rows q [R, D] (bf16, unscaled): vdpbf16ps takes both as they are stored (each bf16 product
// is exact in float32, the sums are float32) and `scale` multiplies the finished dot, so no
// token is converted to float and no dot waits on one accumulator chain: four tokens per
// step, one chain each, the query row held in registers. s[r * ld + j] = scale * q_r . k_j.
template <int NC>
inline void bf16_key_scores(const bf16* q, std::int64_t R, const bf16* const* k, int nb,
                            float scale, float* s, std::int64_t ld) {
  constexpr std::int64_t D = 32 * NC;
  auto ld_bh = [](const bf16* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); };
  for (std::int64_t r = 0; r < R; ++r) {
    __m512bh qv[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) qv[c] = ld_bh(q + r * D + 32 * c);
    float* sr = s + r * ld;
    int j = 0;
    for (; j + 4 <= nb; j += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        a0 = _mm512_dpbf16_ps(a0, qv[c], ld_bh(k[j] + 32 * c));
        a1 = _mm512_dpbf16_ps(a1, qv[c], ld_bh(k[j + 1] + 32 * c));
        a2 = _mm512_dpbf16_ps(a2, qv[c], ld_bh(k[j + 2] + 32 * c));
        a3 = _mm512_dpbf16_ps(a3, qv[c], ld_bh(k[j + 3] + 32 * c));
      }
      sr[j] = _mm512_reduce_add_ps(a0) * scale;
      sr[j + 1] = _mm512_reduce_add_ps(a1) * scale;
      sr[j + 2] = _mm512_reduce_add_ps(a2) * scale;
      sr[j + 3] = _mm512_reduce_add_ps(a3) * scale;
    }
    for (; j < nb; ++j) {
      __m512 a0 = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) a0 = _mm512_dpbf16_ps(a0, qv[c], ld_bh(k[j] + 32 * c));
      sr[j] = _mm512_reduce_add_ps(a0) * scale;
    }
  }
}

// Whether the bf16 ring path (bf16_key_scores, bf16_value_accumulate) takes a call: head_dim
// 32, 64, 128 or 256 (the chunks of 32 channels; 0: the generic path).
inline int bf16_key_chunks(std::int64_t d) {
  return d == 32 ? 1 : d == 64 ? 2 : d == 128 ? 4 : d == 256 ? 8 : 0;
}

// acc[r] += sum_j p[r][j] v_j over `nb` bf16 value rows, acc [R, D] float32 kept in the
// "pair-split" order of each 32-channel chunk (the 16 even channels, then the 16 odd ones):
// a bf16 pair widens to two float32 lanes with one shift (even) and one mask (odd), no
// zero-extension, and the accumulators stay in registers for the whole block.
// bf16_unsplit_rows puts the rows back in channel order.
template <int NC>
inline void bf16_value_accumulate(const float* p, std::int64_t ld, std::int64_t R,
                                  const bf16* const* v, int nb, float* acc) {
  constexpr std::int64_t D = 32 * NC;
  const __m512i odd_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (std::int64_t r = 0; r < R; ++r) {
    float* ar = acc + r * D;
    __m512 a[2 * NC];
#pragma GCC unroll 16
    for (int c = 0; c < 2 * NC; ++c) a[c] = _mm512_loadu_ps(ar + 16 * c);
    const float* pr = p + r * ld;
    for (int j = 0; j < nb; ++j) {
      if (pr[j] == 0.0f) continue;
      const __m512 pv = _mm512_set1_ps(pr[j]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        const __m512i raw = _mm512_loadu_si512(v[j] + 32 * c);
        a[2 * c] = _mm512_fmadd_ps(pv, _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), a[2 * c]);
        a[2 * c + 1] = _mm512_fmadd_ps(
            pv, _mm512_castsi512_ps(_mm512_and_si512(raw, odd_mask)), a[2 * c + 1]);
      }
    }
#pragma GCC unroll 16
    for (int c = 0; c < 2 * NC; ++c) _mm512_storeu_ps(ar + 16 * c, a[c]);
  }
}

// Pair-split order (see bf16_value_accumulate) -> channel order, rows [R, D] in place.
inline void bf16_unsplit_rows(float* acc, std::int64_t R, std::int64_t D) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (std::int64_t i = 0; i < R * D; i += 32) {
    const __m512 even = _mm512_loadu_ps(acc + i), odd = _mm512_loadu_ps(acc + i + 16);
    _mm512_storeu_ps(acc + i, _mm512_permutex2var_ps(even, lo, odd));
    _mm512_storeu_ps(acc + i + 16, _mm512_permutex2var_ps(even, hi, odd));
  }
}

}  // namespace qwen3_fast::cpu::fd_bf16
