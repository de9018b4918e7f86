// Host-side scalar conversions for the CPU kernels, written so that GCC/Clang vectorize
// loops over them (no branches, bit casts through memcpy). Rounding matches PyTorch:
// round-to-nearest-even for float32 -> bfloat16, IEEE for float16.
#pragma once
#include <cstdint>
#include <cstring>

namespace qwen3_fast::cpu {

struct bf16 { std::uint16_t bits; };

// IEEE half held as raw bits. Conversions below are branch-free integer/float bit tricks
// rather than _Float16: GCC 12 does not vectorize loops over _Float16 conversions on x86,
// while these vectorize like the bfloat16 ones.
struct f16 { std::uint16_t bits; };

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

inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(f16 v) {
  const std::uint32_t h = v.bits;
  const std::uint32_t shifted_exp = 0x7c00u << 13;
  std::uint32_t o = (h & 0x7fffu) << 13;  // exponent + mantissa in float position
  const std::uint32_t exp = o & shifted_exp;
  o += (127u - 15u) << 23;  // rebias
  const std::uint32_t inf_nan = o + ((128u - 16u) << 23);
  // subnormal half: renormalize through a float subtraction of 2^-14
  const std::uint32_t sub = float_to_bits(bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23));
  o = exp == shifted_exp ? inf_nan : (exp == 0 ? sub : o);
  return bits_to_float(o | ((h & 0x8000u) << 16));
}

template <> inline f16 from_float<f16>(float v) {  // round to nearest even
  std::uint32_t f = float_to_bits(v);
  const std::uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const std::uint32_t f32_inf = 255u << 23, f16_max = (127u + 16u) << 23;
  const std::uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const std::uint32_t big = f > f32_inf ? 0x7e00u : 0x7c00u;  // NaN or overflow to inf
  const std::uint32_t denorm = float_to_bits(bits_to_float(f) + bits_to_float(denorm_magic)) - denorm_magic;
  const std::uint32_t mant_odd = (f >> 13) & 1u;
  const std::uint32_t normal = (f + ((15u - 127u) << 23) + 0xfffu + mant_odd) >> 13;
  const std::uint32_t o = f >= f16_max ? big : (f < (113u << 23) ? denorm : normal);
  return f16{static_cast<std::uint16_t>(o | (sign >> 16))};
}

// Round through a storage type and back: HF casts intermediates to the model dtype.
template <typename T> inline float round_to(float v) { return to_float(from_float<T>(v)); }

}  // namespace qwen3_fast::cpu
