// Host-side scalar conversions for the CPU kernels, written so that GCC/Clang vectorize
// loops over them (no branches, bit casts through memcpy). Rounding matches PyTorch:
// round-to-nearest-even for float32 -> bfloat16, IEEE for float16.
#pragma once
#include <cstdint>
#include <cstring>

namespace qwen3_fast::cpu {

struct bf16 { std::uint16_t bits; };

#if defined(__FLT16_MANT_DIG__)
using f16 = _Float16;  // hardware conversions (F16C / AVX512-FP16) when compiled for them
#define QWEN3_FAST_HAS_FLOAT16 1
#else
struct f16 { std::uint16_t bits; };
#endif

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  std::uint32_t u = static_cast<std::uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline bf16 from_float<bf16>(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16{static_cast<std::uint16_t>(nan ? 0x7fc0u : rounded)};
}

#if defined(QWEN3_FAST_HAS_FLOAT16)
inline float to_float(f16 v) { return static_cast<float>(v); }
template <> inline f16 from_float<f16>(float v) { return static_cast<f16>(v); }
#else
// Portable IEEE half conversion (round to nearest even) for compilers without _Float16.
inline float to_float(f16 v) {
  const std::uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu,
                      man = h & 0x3ffu;
  std::uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half -> normal float
    float f = static_cast<float>(man) * (1.0f / 16777216.0f);
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <> inline f16 from_float<f16>(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  std::uint32_t a = u & 0x7fffffffu;
  std::uint16_t out;
  if (a > 0x7f800000u) {
    out = static_cast<std::uint16_t>(sign | 0x7e00u);
  } else if (a >= 0x477ff000u) {  // rounds to >= 65520: inf
    out = static_cast<std::uint16_t>(sign | 0x7c00u);
  } else if (a < 0x38800000u) {  // subnormal or zero half
    float f;
    std::memcpy(&f, &a, 4);
    out = static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(__builtin_nearbyintf(f * 16777216.0f)));
  } else {
    const std::uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    out = static_cast<std::uint16_t>(sign | (r >> 13));
  }
  return f16{out};
}
#endif

// Round through a storage type and back: HF casts intermediates to the model dtype.
template <typename T> inline float round_to(float v) { return to_float(from_float<T>(v)); }

}  // namespace qwen3_fast::cpu
