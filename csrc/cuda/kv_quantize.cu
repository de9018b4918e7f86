// QuantSpec KV quantization on the GPU (format: csrc/include/qwen3_fast/kv_quant_math.h;
// same arithmetic as csrc/cpu/kv_quantize.cpp: IEEE division, floor(y + 0.5), the scale
// rounded to nearest in the model dtype then one step up if 15*s would not cover the range).
// Keys (per_column): one block per [rows, cols] group, one thread per column walking the
// rows: min/max, then codes of token pairs (2j, 2j+1) packed into byte j of the column's
// row of the channel-major [cols, rows/2] output; consecutive threads read consecutive
// columns.
// Values (per row): one warp per row, lanes over column pairs, warp-shuffle min/max.
#include "cuda_utils.cuh"
#include "kernels.h"
#include "qwen3_fast/kv_quant_math.h"

namespace qwen3_fast::cuda {

namespace {
template <typename T> __device__ __forceinline__ T next_up(T v);
template <> __device__ __forceinline__ float next_up<float>(float v) { return nextafterf(v, INFINITY); }
template <> __device__ __forceinline__ __half next_up<__half>(__half v) {
  return __ushort_as_half(static_cast<unsigned short>(__half_as_ushort(v) + 1));
}
template <> __device__ __forceinline__ __nv_bfloat16 next_up<__nv_bfloat16>(__nv_bfloat16 v) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(__bfloat16_as_ushort(v) + 1));
}

template <typename T> __device__ __forceinline__ T scale_up(float range) {
  T r = from_float<T>(range / 15.0f);
  if (to_float(r) * 15.0f < range) r = next_up<T>(r);
  return r;
}

template <typename T>
__global__ void quantize_columns(const T* __restrict__ x, std::uint8_t* __restrict__ u,
                                 std::uint8_t* __restrict__ l, T* __restrict__ mn,
                                 T* __restrict__ sc, std::int64_t rows, std::int64_t cols) {
  const std::int64_t o = blockIdx.x;
  const std::int64_t pairs = rows / 2;
  const T* xg = x + o * rows * cols;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float lo = INFINITY, hi = -INFINITY;
    for (std::int64_t r = 0; r < rows; ++r) {
      const float a = to_float(xg[r * cols + c]);
      lo = fminf(lo, a); hi = fmaxf(hi, a);
    }
    const T m = from_float<T>(lo);
    const T s = scale_up<T>(hi - lo);
    mn[o * cols + c] = m;
    sc[o * cols + c] = s;
    const float fm = to_float(m), fs = to_float(s);
    std::uint8_t* uc = u + (o * cols + c) * pairs;
    std::uint8_t* lc = l + (o * cols + c) * pairs;
    for (std::int64_t j = 0; j < pairs; ++j) {
      const int c0 = kv_code8(to_float(xg[2 * j * cols + c]), fm, fs);
      const int c1 = kv_code8(to_float(xg[(2 * j + 1) * cols + c]), fm, fs);
      uc[j] = kv_pack(kv_upper(c0), kv_upper(c1));
      lc[j] = kv_pack(kv_lower(c0), kv_lower(c1));
    }
  }
}

template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, std::uint8_t* __restrict__ u,
                              std::uint8_t* __restrict__ l, T* __restrict__ mn,
                              T* __restrict__ sc, std::int64_t n_rows, std::int64_t cols) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= n_rows) return;
  const std::int64_t half = cols / 2;
  const T* xr = x + row * cols;
  float lo = INFINITY, hi = -INFINITY;
  for (std::int64_t c = lane; c < cols; c += 32) {
    const float a = to_float(xr[c]);
    lo = fminf(lo, a); hi = fmaxf(hi, a);
  }
  for (int off = 16; off > 0; off >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  const T m = from_float<T>(lo);
  const T s = scale_up<T>(hi - lo);
  if (lane == 0) { mn[row] = m; sc[row] = s; }
  const float fm = to_float(m), fs = to_float(s);
  for (std::int64_t i = lane; i < half; i += 32) {
    const int c0 = kv_code8(to_float(xr[2 * i]), fm, fs);
    const int c1 = kv_code8(to_float(xr[2 * i + 1]), fm, fs);
    u[row * half + i] = kv_pack(kv_upper(c0), kv_upper(c1));
    l[row * half + i] = kv_pack(kv_lower(c0), kv_lower(c1));
  }
}
}  // namespace

void kv_quantize(ptr x, ptr u, ptr l, ptr mn, ptr sc, std::int64_t outer, std::int64_t rows,
                 std::int64_t cols, int per_column, int dtype, ptr stream) {
  check_arg(outer >= 0 && rows > 0 && cols > 0, "kv_quantize: sizes must be positive");
  check_arg(cols % 2 == 0, "kv_quantize: cols must be even, got " + std::to_string(cols));
  check_arg(!per_column || rows % 2 == 0,
            "kv_quantize: key groups must have an even token count, got " + std::to_string(rows));
  if (outer == 0) return;
  check_ptr(x, "x"); check_ptr(u, "u"); check_ptr(l, "l"); check_ptr(mn, "mn"); check_ptr(sc, "sc");
  dispatch_dtype(dtype, "x", [&](auto tx) {
    using T = typename decltype(tx)::type;
    auto* up = reinterpret_cast<std::uint8_t*>(u);
    auto* lp = reinterpret_cast<std::uint8_t*>(l);
    if (per_column) {
      const int threads = static_cast<int>(std::min<std::int64_t>(256, std::max<std::int64_t>(32, cols)));
      quantize_columns<T><<<static_cast<unsigned>(outer), threads, 0, as_stream(stream)>>>(
          reinterpret_cast<const T*>(x), up, lp, reinterpret_cast<T*>(mn), reinterpret_cast<T*>(sc),
          rows, cols);
    } else {
      const std::int64_t n_rows = outer * rows;
      constexpr int kWarps = 4;
      quantize_rows<T><<<static_cast<unsigned>(ceil_div(n_rows, kWarps)), 32 * kWarps, 0, as_stream(stream)>>>(
          reinterpret_cast<const T*>(x), up, lp, reinterpret_cast<T*>(mn), reinterpret_cast<T*>(sc),
          n_rows, cols);
    }
    QWEN3_FAST_CHECK_LAUNCH("kv_quantize");
  });
}

}  // namespace qwen3_fast::cuda
