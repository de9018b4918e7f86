// SwiGLU activation on the CPU: y = silu(gate) * up with gate_up = [gate | up] per row.
// Rounds like HF's `act_fn(gate) * up` in the model dtype: silu rounded, then the product.
// The backward recomputes silu from gate_up instead of saving it.
#include <cstdint>
#include <type_traits>

#include "cpu_math.h"
#include "kernels.h"
#include "qwen3_fast/norm_act_math.h"

#if defined(__AVX512F__)
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* values.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace qwen3_fast::cpu {

#if defined(__AVX512F__)
namespace {
// Outputs above this size (2x this machine class's 32 MiB L3) are written with streaming
// stores.
constexpr std::int64_t kStreamStoreBytes = std::int64_t{64} << 20;

// bfloat16 rows with AVX-512 intrinsics. The generic loop below vectorizes too, but GCC
// if-converts vexp's clamps into masked copies of the whole computation (divisions
// included), which costs 1.6x in a microbenchmark; x86 min/max here keep one path.
// Same polynomial and the same round-to-nearest-even as the generic loop: bit-identical.
inline __m512 exp16(__m512 x) {
  // vexp's results: +inf above 88.72, 1e-38-ish below -87.3 (clamped), NaN passes
  // through (min/max return the second operand when either is NaN).
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72f), _CMP_GT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), _mm512_min_ps(_mm512_set1_ps(88.7f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), overflow, _mm512_set1_ps(__builtin_inff()));
}

inline __m512 load_bf16x16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float -> bfloat16 bits, round to nearest even, NaN -> 0x7fc0 (as from_float<bf16>)
inline __m256i to_bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// float -> the float value of its bfloat16 rounding (round to nearest even), without the
// pack/unpack round trip of to_bf16x16. NaN stays NaN (0x7fc00000).
inline __m512 round_bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))),
                               _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000));
  return _mm512_castsi512_ps(r);
}

// Columns [0, n - n % 16) of one row; returns where the scalar tail starts.
// `stream`: write y with non-temporal stores (the caller issues the sfence). A normal store
// first reads the destination line into cache (read-for-ownership), so for an output much
// larger than the last-level cache streaming saves a third of the memory traffic; for small
// outputs the next op wants y in cache, so they keep normal stores.
template <bool stream>
inline std::int64_t silu_and_mul_row_bf16(const bf16* g, const bf16* u, bf16* y, std::int64_t n) {
  std::int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 gv = load_bf16x16(g + c);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 a = round_bf16x16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
    const __m512 out = _mm512_mul_ps(a, load_bf16x16(u + c));
    if constexpr (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(y + c), to_bf16x16(out));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), to_bf16x16(out));
    }
  }
  return c;
}
}  // namespace
#endif

void silu_and_mul_forward(ptr gate_up, std::int64_t stride, ptr y, std::int64_t rows,
                          std::int64_t inter, int dtype, int num_threads) {
  check_arg(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  check_arg(inter > 0, "inter must be > 0, got " + std::to_string(inter));
  check_arg(rows <= 1 || stride >= 2 * inter, "gate_up row stride must be >= 2 * inter");
  if (rows == 0) return;
  check_ptr(gate_up, "gate_up"); check_ptr(y, "y");
  dispatch_dtype(dtype, "gate_up", [&](auto t) {
    using T = typename decltype(t)::type;
    const T* gp = reinterpret_cast<const T*>(gate_up);
    T* yp = reinterpret_cast<T*>(y);
#if defined(__AVX512F__)
    // Stream when y is far bigger than the last-level cache and every row starts 32-byte
    // aligned (the stream store needs it).
    const bool stream = rows * inter * static_cast<std::int64_t>(sizeof(T)) > kStreamStoreBytes &&
                        reinterpret_cast<std::uintptr_t>(yp) % 32 == 0 &&
                        (inter * static_cast<std::int64_t>(sizeof(T))) % 32 == 0;
    (void)stream;  // only the bf16 path streams
#endif
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* g = gp + r * stride;
      const T* u = g + inter;
      T* yr = yp + r * inter;
      std::int64_t start = 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, bf16>) {
        if (stream) {
          start = silu_and_mul_row_bf16<true>(g, u, yr, inter);
          _mm_sfence();  // order this row's streamed stores before the tail and the join
        } else {
          start = silu_and_mul_row_bf16<false>(g, u, yr, inter);
        }
      }
#endif
#pragma omp simd
      for (std::int64_t c = start; c < inter; ++c) {
        const float gv = to_float(g[c]);
        const float a = round_to<T>(qwen3_fast::silu_from_exp_neg(gv, vexp(-gv)));
        yr[c] = from_float<T>(a * to_float(u[c]));
      }
    }
  });
}

void silu_and_mul_backward(ptr dy, ptr gate_up, std::int64_t stride, ptr d_gate_up,
                           std::int64_t rows, std::int64_t inter, int dtype, int num_threads) {
  check_arg(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  check_arg(inter > 0, "inter must be > 0, got " + std::to_string(inter));
  check_arg(rows <= 1 || stride >= 2 * inter, "gate_up row stride must be >= 2 * inter");
  if (rows == 0) return;
  check_ptr(dy, "dy"); check_ptr(gate_up, "gate_up"); check_ptr(d_gate_up, "d_gate_up");
  dispatch_dtype(dtype, "gate_up", [&](auto t) {
    using T = typename decltype(t)::type;
    const T* dyp = reinterpret_cast<const T*>(dy);
    const T* gp = reinterpret_cast<const T*>(gate_up);
    T* dp = reinterpret_cast<T*>(d_gate_up);
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* g = gp + r * stride;
      const T* u = g + inter;
      const T* dyr = dyp + r * inter;
      T* dg = dp + r * 2 * inter;
      T* du = dg + inter;
#pragma omp simd
      for (std::int64_t c = 0; c < inter; ++c) {
        const float gv = to_float(g[c]);
        const float sig = qwen3_fast::sigmoid_from_exp_neg(vexp(-gv));
        const float d = to_float(dyr[c]);
        dg[c] = from_float<T>(qwen3_fast::swiglu_dgate(d, gv, to_float(u[c]), sig));
        du[c] = from_float<T>(qwen3_fast::swiglu_dup(d, gv, sig));
      }
    }
  });
}

}  // namespace qwen3_fast::cpu
