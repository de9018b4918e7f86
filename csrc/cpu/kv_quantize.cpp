// QuantSpec KV quantization on the CPU (format: csrc/include/qwen3_fast/kv_quant_math.h).
// Groups are either columns of a [rows, cols] tile (keys: per channel over G tokens) or
// whole rows (values: per token over a group along head_dim). Two passes per group:
// min/max, then codes; the split into nibbles and their packing happen in the same pass.
// Key tiles are stored channel-major, packed along tokens: [cols, rows/2] bytes, byte j of
// channel c holding tokens 2j (low nibble) and 2j+1 (high), so flash-decoding scores a
// channel against a run of tokens with SIMD (csrc/cpu/flash_decode.cpp).
#include <algorithm>
#include <vector>

#include "cpu_math.h"
#include "kernels.h"
#include "qwen3_fast/kv_quant_math.h"

namespace qwen3_fast::cpu {

namespace {
// Round the fp32 scale to the storage type, up: 15 * s must cover the group's range.
template <typename T> inline T scale_up(float range) {
  const float s = range / 15.0f;
  T r = from_float<T>(s);
  if (to_float(r) * 15.0f < range) {
    if constexpr (std::is_same_v<T, float>) {
      r = std::nextafter(r, INFINITY);
    } else {
      r.bits = static_cast<std::uint16_t>(r.bits + 1);  // positive finite: next value up
    }
  }
  return r;
}

// Codes of a contiguous run (contiguous loads vectorize; interleaved bf16 loads do not),
// then the nibble split and packing of element pairs.
inline void pack_codes(const std::uint8_t* c, std::uint8_t* u, std::uint8_t* l,
                       std::int64_t half) {
#pragma omp simd
  for (std::int64_t i = 0; i < half; ++i) {
    const int c0 = c[2 * i], c1 = c[2 * i + 1];
    u[i] = kv_pack(kv_upper(c0), kv_upper(c1));
    l[i] = kv_pack(kv_lower(c0), kv_lower(c1));
  }
}

template <typename T>
void quantize_tile(const T* x, std::uint8_t* u, std::uint8_t* l, T* mn_out, T* sc_out,
                   std::int64_t rows, std::int64_t cols, bool per_column, float* fmn,
                   float* fsc, std::uint8_t* codes, float* xf) {
  const std::int64_t half = cols / 2;
  if (per_column) {
    // fmn/fsc: [cols] scratch
    for (std::int64_t c = 0; c < cols; ++c) { fmn[c] = to_float(x[c]); fsc[c] = fmn[c]; }
    for (std::int64_t r = 1; r < rows; ++r) {
      const T* xr = x + r * cols;
#pragma omp simd
      for (std::int64_t c = 0; c < cols; ++c) {
        const float v = to_float(xr[c]);
        fmn[c] = v < fmn[c] ? v : fmn[c];
        fsc[c] = v > fsc[c] ? v : fsc[c];
      }
    }
    for (std::int64_t c = 0; c < cols; ++c) {
      const T m = from_float<T>(fmn[c]);  // exact: the min is a stored value
      const T s = scale_up<T>(fsc[c] - fmn[c]);
      mn_out[c] = m; sc_out[c] = s;
      fmn[c] = to_float(m); fsc[c] = to_float(s);
    }
    // codes: [rows, cols] scratch; then pack token pairs of each channel
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      std::uint8_t* cr = codes + r * cols;
#pragma omp simd
      for (std::int64_t c = 0; c < cols; ++c) xf[c] = to_float(xr[c]);
#pragma omp simd
      for (std::int64_t c = 0; c < cols; ++c)
        cr[c] = static_cast<std::uint8_t>(kv_code8(xf[c], fmn[c], fsc[c]));
    }
    const std::int64_t pairs = rows / 2;
    for (std::int64_t c = 0; c < cols; ++c) {
      std::uint8_t* uc = u + c * pairs;
      std::uint8_t* lc = l + c * pairs;
      for (std::int64_t j = 0; j < pairs; ++j) {
        const int c0 = codes[2 * j * cols + c], c1 = codes[(2 * j + 1) * cols + c];
        uc[j] = kv_pack(kv_upper(c0), kv_upper(c1));
        lc[j] = kv_pack(kv_lower(c0), kv_lower(c1));
      }
    }
  } else {
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      float lo = to_float(xr[0]), hi = lo;
#pragma omp simd reduction(min : lo) reduction(max : hi)
      for (std::int64_t c = 0; c < cols; ++c) {
        const float v = to_float(xr[c]);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
      }
      const T m = from_float<T>(lo);
      const T s = scale_up<T>(hi - lo);
      mn_out[r] = m; sc_out[r] = s;
      const float mf = to_float(m), sf = to_float(s);
#pragma omp simd
      for (std::int64_t c = 0; c < cols; ++c) xf[c] = to_float(xr[c]);
#pragma omp simd
      for (std::int64_t c = 0; c < cols; ++c)
        codes[c] = static_cast<std::uint8_t>(kv_code8(xf[c], mf, sf));
      pack_codes(codes, u + r * half, l + r * half, half);
    }
  }
}
}  // namespace

void kv_quantize(ptr x, ptr u, ptr l, ptr mn, ptr sc, std::int64_t outer, std::int64_t rows,
                 std::int64_t cols, int per_column, int dtype, int num_threads) {
  check_arg(outer >= 0 && rows > 0 && cols > 0, "kv_quantize: sizes must be positive");
  check_arg(cols % 2 == 0, "kv_quantize: cols must be even (two 4-bit codes per byte), got " +
                               std::to_string(cols));
  check_arg(!per_column || rows % 2 == 0,
            "kv_quantize: key groups must have an even token count, got " + std::to_string(rows));
  if (outer == 0) return;
  check_ptr(x, "x"); check_ptr(u, "u"); check_ptr(l, "l"); check_ptr(mn, "mn"); check_ptr(sc, "sc");
  dispatch_dtype(dtype, "x", [&](auto tx) {
    using T = typename decltype(tx)::type;
    const T* xp = reinterpret_cast<const T*>(x);
    auto* up = reinterpret_cast<std::uint8_t*>(u);
    auto* lp = reinterpret_cast<std::uint8_t*>(l);
    T* mp = reinterpret_cast<T*>(mn);
    T* sp = reinterpret_cast<T*>(sc);
    const std::int64_t meta = per_column ? cols : rows;
#pragma omp parallel num_threads(clamp_threads(num_threads))
    {
      std::vector<float> fmn(cols), fsc(cols);
      std::vector<std::uint8_t> codes(per_column ? rows * cols : cols);
      std::vector<float> xf(cols);
#pragma omp for schedule(static)
      for (std::int64_t o = 0; o < outer; ++o) {
        quantize_tile<T>(xp + o * rows * cols, up + o * rows * (cols / 2),
                         lp + o * rows * (cols / 2), mp + o * meta, sp + o * meta, rows, cols,
                         per_column != 0, fmn.data(), fsc.data(), codes.data(), xf.data());
      }
    }
  });
}

// The inverse, to float32 (tests, the reference view of a cache): bits 8 reads U and L
// (code 16U + L - 8), bits 4 only U (code 16U); value = code * s/16 + min, the product
// rounded before the add as torch does (no FMA: the result must equal the reference).
__attribute__((optimize("fp-contract=off")))
void kv_dequantize(ptr u, ptr l, ptr mn, ptr sc, ptr out, std::int64_t outer,
                   std::int64_t rows, std::int64_t cols, int per_column, int bits, int dtype,
                   int num_threads) {
  check_arg(outer >= 0 && rows > 0 && cols > 0 && cols % 2 == 0,
            "kv_dequantize: sizes must be positive, cols even");
  check_arg(!per_column || rows % 2 == 0, "kv_dequantize: key groups need an even token count");
  check_arg(bits == 8 || bits == 4, "kv_dequantize: bits must be 8 or 4, got " + std::to_string(bits));
  if (outer == 0) return;
  check_ptr(u, "u"); check_ptr(mn, "mn"); check_ptr(sc, "sc"); check_ptr(out, "out");
  if (bits == 8) check_ptr(l, "l");
  dispatch_dtype(dtype, "mn", [&](auto tx) {
    using T = typename decltype(tx)::type;
    const auto* up = reinterpret_cast<const std::uint8_t*>(u);
    const auto* lp = reinterpret_cast<const std::uint8_t*>(l);
    const T* mp = reinterpret_cast<const T*>(mn);
    const T* sp = reinterpret_cast<const T*>(sc);
    float* op = reinterpret_cast<float*>(out);
    const std::int64_t half = cols / 2, pairs = rows / 2;
    auto code = [&](int ub, int lb) { return bits == 8 ? kv_code_from(ub, lb) : 16 * ub; };
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t o = 0; o < outer; ++o) {
      float* og = op + o * rows * cols;
      if (per_column) {  // codes [cols, rows/2] -> out [rows, cols]
        for (std::int64_t c = 0; c < cols; ++c) {
          const float st = to_float(sp[o * cols + c]) * 0.0625f, m = to_float(mp[o * cols + c]);
          const std::int64_t base = (o * cols + c) * pairs;
          for (std::int64_t j = 0; j < pairs; ++j) {
            const int ub = up[base + j], lb = bits == 8 ? lp[base + j] : 0;
            og[2 * j * cols + c] = static_cast<float>(code(kv_lo(ub), kv_lo(lb))) * st + m;
            og[(2 * j + 1) * cols + c] = static_cast<float>(code(kv_hi(ub), kv_hi(lb))) * st + m;
          }
        }
      } else {  // one group per row: codes [rows, cols/2] -> out [rows, cols]
        for (std::int64_t r = 0; r < rows; ++r) {
          const std::int64_t g = o * rows + r;
          const float st = to_float(sp[g]) * 0.0625f, m = to_float(mp[g]);
          for (std::int64_t i = 0; i < half; ++i) {
            const int ub = up[g * half + i], lb = bits == 8 ? lp[g * half + i] : 0;
            og[r * cols + 2 * i] = static_cast<float>(code(kv_lo(ub), kv_lo(lb))) * st + m;
            og[r * cols + 2 * i + 1] = static_cast<float>(code(kv_hi(ub), kv_hi(lb))) * st + m;
          }
        }
      }
    }
  });
}

}  // namespace qwen3_fast::cpu
