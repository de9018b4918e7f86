// Fused residual add + RMSNorm on CUDA (same math as csrc/cpu/add_rms_norm.cpp):
// new_residual = round_to_x_dtype(x + residual), then HF Qwen3RMSNorm of new_residual.
// One read of x and residual, one write of each output: the sum is kept in registers
// between the sum of squares and the normalization (rows too long for the register cache
// re-read their tail from new_residual, which the same thread just wrote). Thread mapping
// as in rms_norm.cu. The backward is rms_norm_backward with d_residual.
#include "cuda/kernels.h"
#include "cuda/cuda_utils.cuh"

namespace qwen3_fast::cuda {

namespace {

constexpr int kCache = 4;  // packs per thread kept in registers
constexpr int kBlock = 256;

// new_residual pack = round_to<TX>(x + residual), stored; returns its sum of squares.
template <typename TX, int V>
__device__ __forceinline__ float add_store(const TX* x, const TX* r, TX* out, Pack<TX, V>& s) {
  const Pack<TX, V> xv = load_pack<TX, V>(x);
  const Pack<TX, V> rv = load_pack<TX, V>(r);
#pragma unroll
  for (int j = 0; j < V; ++j) s.v[j] = from_float<TX>(to_float(xv.v[j]) + to_float(rv.v[j]));
  store_pack<TX, V>(out, s);
  return sum_squares(s);
}

template <typename TX, typename TW, int V, int NV>
__global__ void __launch_bounds__(1024)
add_rms_norm_kernel(const TX* __restrict__ x, std::int64_t x_stride,
                    const TX* __restrict__ residual, std::int64_t r_stride,
                    const TW* __restrict__ w, TW* __restrict__ y, TX* __restrict__ new_residual,
                    float* __restrict__ rstd, std::int64_t rows, int cols, int tpr, int rpb,
                    double eps) {
  __shared__ float red[32];
  const int nvec = cols / V;
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  for (std::int64_t r0 = static_cast<std::int64_t>(blockIdx.x) * rpb; r0 < rows;
       r0 += static_cast<std::int64_t>(gridDim.x) * rpb) {
    const std::int64_t row = r0 + group;
    const bool active = row < rows;
    const TX* xr = x + row * x_stride;
    const TX* rr = residual + row * r_stride;
    TX* nr = new_residual + row * cols;
    Pack<TX, V> cache[NV];
    float ss = 0.0f;
    if (active) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) ss += add_store<TX, V>(xr + i * V, rr + i * V, nr + i * V, cache[k]);
      }
      for (int i = lane + NV * tpr; i < nvec; i += tpr) {
        Pack<TX, V> s;
        ss += add_store<TX, V>(xr + i * V, rr + i * V, nr + i * V, s);
      }
    }
    ss = group_sum(ss, tpr, red);
    if (active) {
      const float rs = rms_inv(ss, cols, eps);
      if (lane == 0) rstd[row] = rs;
      TW* yr = y + row * cols;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) normalize_store<TX, TW, V>(cache[k], w + i * V, yr + i * V, rs);
      }
      for (int i = lane + NV * tpr; i < nvec; i += tpr) {
        normalize_store<TX, TW, V>(load_pack<TX, V>(nr + i * V), w + i * V, yr + i * V, rs);
      }
    }
  }
}

template <typename TX, typename TW, int V>
void launch(ptr x, std::int64_t x_stride, ptr residual, std::int64_t r_stride, ptr weight,
            ptr y, ptr new_residual, ptr rstd, std::int64_t rows, std::int64_t cols, double eps,
            cudaStream_t stream) {
  const RowConfig cfg = row_config(cols / V, kCache, kBlock, 1024);
  const unsigned grid = grid_for(ceil_div(rows, cfg.rpb), cfg.threads);
  add_rms_norm_kernel<TX, TW, V, kCache><<<grid, cfg.threads, 0, stream>>>(
      reinterpret_cast<const TX*>(x), x_stride, reinterpret_cast<const TX*>(residual), r_stride,
      reinterpret_cast<const TW*>(weight), reinterpret_cast<TW*>(y),
      reinterpret_cast<TX*>(new_residual), reinterpret_cast<float*>(rstd), rows,
      static_cast<int>(cols), cfg.tpr, cfg.rpb, eps);
  QWEN3_FAST_CHECK_LAUNCH("add_rms_norm_forward");
}

}  // namespace

// x: [rows, cols] row stride x_stride, residual: [rows, cols] row stride r_stride (both x's
// dtype, unit column stride), weight: [cols] -> y: [rows, cols] contiguous, weight dtype;
// new_residual: [rows, cols] contiguous, x dtype; rstd: [rows] float32.
void add_rms_norm_forward(ptr x, std::int64_t x_stride, ptr residual, std::int64_t r_stride,
                          ptr weight, ptr y, ptr new_residual, ptr rstd, std::int64_t rows,
                          std::int64_t cols, double eps, int x_dtype, int w_dtype, ptr stream) {
  check_norm_sizes(rows, cols);
  check_row_stride(rows, x_stride, cols, "x");
  check_row_stride(rows, r_stride, cols, "residual");
  if (rows == 0) return;
  check_ptr(x, "x"); check_ptr(residual, "residual"); check_ptr(weight, "weight");
  check_ptr(y, "y"); check_ptr(new_residual, "new_residual"); check_ptr(rstd, "rstd");
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    constexpr int V = 16 / sizeof(TX);
    const bool vec = cols % V == 0 && aligned16(x) && aligned16(residual) &&
                     (rows == 1 || (x_stride % V == 0 && r_stride % V == 0)) &&
                     aligned16(weight) && aligned16(y) && aligned16(new_residual);
    if (vec) {
      launch<TX, TW, V>(x, x_stride, residual, r_stride, weight, y, new_residual, rstd, rows,
                        cols, eps, as_stream(stream));
    } else {
      launch<TX, TW, 1>(x, x_stride, residual, r_stride, weight, y, new_residual, rstd, rows,
                        cols, eps, as_stream(stream));
    }
  });
}

}  // namespace qwen3_fast::cuda
