// Hierarchical (QuantSpec) KV format math shared by the CPU and CUDA kernels: the exact
// 8-bit code split into two 4-bit halves, nibble packing, and the log-sum-exp merge of
// flash-decoding partials. DESIGN.md "KV caches" is the contract:
//   s = (max - min) / 15 (stored in the model dtype, rounded UP so 15*s covers the range),
//   c = floor((x - min) / (s/16) + 0.5) clamped to [0, 240]  (c = 0 when s == 0),
//   U = (c + 8) >> 4 (0..15),  L = c - 16*U + 8 (0..15);
//   8-bit value = (16*U + L - 8) * s/16 + min = c * s/16 + min,  4-bit value = U*s + min.
// Packing: byte i of a packed row holds element 2i in the low nibble, 2i+1 in the high one.
// Free of torch; plain C++ and, under nvcc, __host__ __device__.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QWEN3_FAST_KVQ_HD __host__ __device__ __forceinline__
#else
#define QWEN3_FAST_KVQ_HD inline
#endif

namespace qwen3_fast {

// The exact 8-bit code of x in a group with (stored) min and scale. floor(y + 0.5), not
// rint: the same expression in torch, C++, CUDA and Triton gives the same code.
QWEN3_FAST_KVQ_HD int kv_code8(float x, float mn, float s) {
  const float step = s * 0.0625f;  // exact: a power-of-two scaling
  float y = step > 0.0f ? (x - mn) / step : 0.0f;
  y = floorf(y + 0.5f);
  y = y < 0.0f ? 0.0f : (y > 240.0f ? 240.0f : y);
  return static_cast<int>(y);
}
QWEN3_FAST_KVQ_HD int kv_upper(int c) { return (c + 8) >> 4; }
QWEN3_FAST_KVQ_HD int kv_lower(int c) { return c - 16 * kv_upper(c) + 8; }
// Code of a stored pair: 8-bit 16U + L - 8, 4-bit 16U (both in units of s/16).
QWEN3_FAST_KVQ_HD int kv_code_from(int u, int l) { return 16 * u + l - 8; }

QWEN3_FAST_KVQ_HD std::uint8_t kv_pack(int even, int odd) {
  return static_cast<std::uint8_t>((even & 15) | ((odd & 15) << 4));
}
QWEN3_FAST_KVQ_HD int kv_lo(std::uint8_t b) { return b & 15; }
QWEN3_FAST_KVQ_HD int kv_hi(std::uint8_t b) { return b >> 4; }

// Quantized prefix read by the query at position p of a sequence of `length` tokens (verify
// variant of flash-decoding, p in [length - n, length)): codes for [0, nq), the ring for
// [nq, p]. nq = the cache's policy quantized_length(p + 1) = G * max(0, ceil((p + 1 - 2G) / G)),
// so each row sees what one-token decoding of p saw; at least the ring's oldest whole group
// G * ceil((length - ring) / G) (a step longer than S + 1 tokens has overwritten older
// slots); at most n_quant (with the cache's n_quant = quantized_length(length) the last row,
// and so n = 1 decoding, reads exactly n_quant). Same as reference.kv_row_quant_lengths.
QWEN3_FAST_KVQ_HD std::int64_t kv_row_quant_len(std::int64_t p, std::int64_t length,
                                                std::int64_t n_quant, std::int64_t group,
                                                std::int64_t ring) {
  const std::int64_t policy = p > group ? group * ((p - group) / group) : 0;
  const std::int64_t over = length - ring;
  const std::int64_t oldest = over > 0 ? (over + group - 1) / group * group : 0;
  const std::int64_t nq = policy > oldest ? policy : oldest;
  return nq < n_quant ? nq : n_quant;
}

// Flash-decoding merge: partial s has normalized output o_s and lse_s = m_s + log(l_s)
// (-inf when it saw no key). O = sum_s w_s o_s with w_s = exp(lse_s - lse),
// lse = logsumexp_s lse_s. Callers loop: first find lse_max, then accumulate weights.
QWEN3_FAST_KVQ_HD float lse_weight(float lse_s, float lse_max) {
  return lse_s == -INFINITY ? 0.0f : expf(lse_s - lse_max);
}

}  // namespace qwen3_fast
