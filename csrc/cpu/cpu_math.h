// Helpers for the CPU kernels: dtype dispatch and a vectorizable exp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

#include "cpu_dtype.h"
#include "qwen3_fast/common.h"

namespace qwen3_fast::cpu {

template <typename T> struct Type { using type = T; };

// Calls f(Type<TX>{}) for the storage type of a dtype code.
template <typename F>
inline void dispatch_dtype(int code, const char* arg, F&& f) {
  switch (check_dtype(code, arg)) {
    case DType::kFloat32: f(Type<float>{}); break;
    case DType::kFloat16: f(Type<f16>{}); break;
    case DType::kBFloat16: f(Type<bf16>{}); break;
  }
}

// Activations with a weight: the weight has the activation dtype or float32 (HF promotes
// bf16 * fp32 to fp32, so the output has the weight's dtype in every allowed pair).
template <typename F>
inline void dispatch_x_w(int x_code, int w_code, F&& f) {
  dispatch_dtype(x_code, "x", [&](auto tx) {
    if (w_code == x_code) {
      f(tx, tx);
    } else if (w_code == static_cast<int>(DType::kFloat32)) {
      f(tx, Type<float>{});
    } else {
      throw std::invalid_argument(std::string("weight: dtype ") + dtype_name(w_code) +
                                  " must equal the activation dtype " + dtype_name(x_code) +
                                  " or be float32");
    }
  });
}

// exp(x) in float32 to about 2 ulp, branch-free so that loops over it vectorize (glibc's
// vector expf is only used under -ffast-math, which would also change our rounding).
// Overflow gives +inf like expf (silu(-inf) and silu(g < -88.7) then match PyTorch);
// underflow stops at exp(-87.3) ~ 1e-38 instead of denormals, which no caller can see.
inline float vexp(float x) {
  const bool overflow = x > 88.72f;
  // Ternaries, not fminf/fmaxf: those keep NaN rules that block vectorization. NaN fails
  // both tests and propagates through the polynomial.
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = x - n * 0.693145751953125f;  // ln2 split hi/lo
  r = r - n * 1.428606765330187045e-06f;
  // Taylor to degree 6 on |r| <= ln2/2
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::int32_t e = static_cast<std::int32_t>(n) + 127;
  const std::uint32_t bits = static_cast<std::uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return overflow ? __builtin_inff() : p * scale;
}

inline int clamp_threads(int num_threads) { return num_threads > 0 ? num_threads : omp_get_max_threads(); }

}  // namespace qwen3_fast::cpu
