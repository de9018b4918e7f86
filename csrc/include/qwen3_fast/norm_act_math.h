// Scalar math of RMSNorm and SwiGLU that the CPU and CUDA kernels share, written once so
// that both backends evaluate the same fp32 expressions in the same order (the storage
// roundings around them stay in each backend's dtype helpers). Free of torch; compiles as
// plain C++ and, under nvcc, as __host__ __device__.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QWEN3_FAST_HD __host__ __device__ __forceinline__
#else
#define QWEN3_FAST_HD inline
#endif

namespace qwen3_fast {

// 1 / sqrt(mean(x^2) + eps), IEEE division and sqrt (not rsqrt) like the CPU kernel.
QWEN3_FAST_HD float rms_inv(float sum_sq, std::int64_t cols, double eps) {
  return 1.0f / sqrtf(sum_sq / static_cast<float>(cols) + static_cast<float>(eps));
}

// RMSNorm backward per element, with n = x * rstd (not rounded), dn = dy * w and
// mean_dot = mean over the row of dn * n:  dx = rstd * (dn - n * mean_dot).
QWEN3_FAST_HD float rms_norm_dx(float rstd, float dn, float n, float mean_dot) {
  return rstd * (dn - n * mean_dot);
}

// sigmoid from exp(-g); callers pass their backend's exp.
QWEN3_FAST_HD float sigmoid_from_exp_neg(float e) { return 1.0f / (1.0f + e); }
// silu(g) = g * sigmoid(g), written as g / (1 + exp(-g)) like PyTorch.
QWEN3_FAST_HD float silu_from_exp_neg(float g, float e) { return g / (1.0f + e); }

// SwiGLU backward for y = silu(g) * u, d silu(g)/dg = sig * (1 + g * (1 - sig)).
QWEN3_FAST_HD float swiglu_dgate(float dy, float g, float u, float sig) {
  return dy * u * sig * (1.0f + g * (1.0f - sig));
}
QWEN3_FAST_HD float swiglu_dup(float dy, float g, float sig) { return dy * g * sig; }

}  // namespace qwen3_fast
