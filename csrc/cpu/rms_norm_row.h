// Per-row RMSNorm pieces shared by rms_norm.cpp and add_rms_norm.cpp.
// HF Qwen3RMSNorm order: fp32 math, cast the normalized row to the input dtype, then
// multiply by the weight in the weight's dtype.
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu_math.h"
#include "qwen3_fast/norm_act_math.h"

namespace qwen3_fast::cpu {

template <typename TX>
inline float sum_squares(const TX* x, std::int64_t cols) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (std::int64_t c = 0; c < cols; ++c) {
    const float v = to_float(x[c]);
    ss += v * v;
  }
  return ss;
}

template <typename TX, typename TW>
inline void normalize_row(const TX* x, const TW* w, TW* y, float rstd, std::int64_t cols) {
#pragma omp simd
  for (std::int64_t c = 0; c < cols; ++c) {
    const float n = round_to<TX>(to_float(x[c]) * rstd);
    y[c] = from_float<TW>(to_float(w[c]) * n);
  }
}

}  // namespace qwen3_fast::cpu
