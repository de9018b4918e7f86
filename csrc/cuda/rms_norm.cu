// RMSNorm on CUDA, HF Qwen3RMSNorm rounding (same math as csrc/cpu/rms_norm.cpp).
//
// Forward: a group of threads per row (a few lanes for head_dim-sized rows as in QK-norm,
// whole warps for hidden-sized rows), the row held in registers between the sum of squares
// and the write, so x is read once; 16-byte loads/stores when pointers, strides and the
// width allow, scalar otherwise; grid-stride over rows. Backward: partial_rows blocks of at
// most 128 threads, x and dy of the current row in registers, each block summing its rows'
// dweight contributions in shared memory and writing one float32 partial row; Python sums
// the partials.
#include "cuda/kernels.h"
#include "cuda/cuda_utils.cuh"

namespace qwen3_fast::cuda {

namespace {

constexpr int kFwdCache = 4;  // packs per thread kept in registers (forward)
constexpr int kFwdBlock = 256;
// The backward grid is partial_rows = 4 * SMs blocks (ops/_kernel_args.py), so a block
// must fit 4 times per SM: at most 128 threads, at most 128 registers each.
constexpr int kBwdMaxThreads = 128;
constexpr int kBwdBlocksPerSm = 4;
constexpr int kBwdSmemBytes = 48 * 1024;  // dynamic shared memory without an opt-in
// Packs of x and dy per thread kept in registers between the passes: 4 stays under the
// 128-register cap without spills for every dtype pair (6 or 8 spill on sm_90a).
constexpr int kBwdCache = 4;

// Grid-stride over groups of rpb rows; group g of a block owns row r0 + g. The loop bounds
// are uniform across the block (group_sum may synchronize it).
template <typename TX, typename TW, int V, int NV>
__global__ void __launch_bounds__(1024)
rms_norm_fwd_kernel(const TX* __restrict__ x, std::int64_t x_stride, const TW* __restrict__ w,
                    TW* __restrict__ y, float* __restrict__ rstd, std::int64_t rows, int cols,
                    int tpr, int rpb, double eps) {
  __shared__ float red[32];
  const int nvec = cols / V;
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  for (std::int64_t r0 = static_cast<std::int64_t>(blockIdx.x) * rpb; r0 < rows;
       r0 += static_cast<std::int64_t>(gridDim.x) * rpb) {
    const std::int64_t row = r0 + group;
    const bool active = row < rows;
    const TX* xr = x + row * x_stride;
    Pack<TX, V> cache[NV];
    float ss = 0.0f;
    if (active) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) {
          cache[k] = load_pack<TX, V>(xr + i * V);
          ss += sum_squares(cache[k]);
        }
      }
      for (int i = lane + NV * tpr; i < nvec; i += tpr) {
        ss += sum_squares(load_pack<TX, V>(xr + i * V));
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
        normalize_store<TX, TW, V>(load_pack<TX, V>(xr + i * V), w + i * V, yr + i * V, rs);
      }
    }
  }
}

// One pack of the backward, pass 1: returns this pack's share of sum(dy * w * n) and adds
// dy * round_to<TX>(n) to the dweight sums at acc (HF multiplies the weight by the rounded
// normalized value).
template <typename TX, typename TW, int V>
__device__ __forceinline__ float bwd_dot(const Pack<TX, V>& xv, const Pack<TW, V>& gv,
                                         const TW* w, float rs, float* acc) {
  const Pack<TW, V> wv = load_pack<TW, V>(w);
  Pack<float, V> a = load_pack<float, V>(acc);
  float dot = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float n = to_float(xv.v[j]) * rs;
    const float g = to_float(gv.v[j]);
    dot += g * to_float(wv.v[j]) * n;
    a.v[j] += g * round_to<TX>(n);
  }
  store_pack<float, V, /*kGlobal=*/false>(acc, a);  // shared or global memory
  return dot;
}

// Pass 2: dx = rstd * (dy * w - n * mean_dot) (+ d_residual), in x's dtype.
template <typename TX, typename TW, int V>
__device__ __forceinline__ void bwd_store(const Pack<TX, V>& xv, const Pack<TW, V>& gv,
                                          const TW* w, const TX* dres, TX* dx, float rs,
                                          float mean_dot) {
  const Pack<TW, V> wv = load_pack<TW, V>(w);
  Pack<TX, V> out;
  if (dres != nullptr) {
    const Pack<TX, V> rv = load_pack<TX, V>(dres);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float n = to_float(xv.v[j]) * rs;
      const float dn = to_float(gv.v[j]) * to_float(wv.v[j]);
      out.v[j] = from_float<TX>(rms_norm_dx(rs, dn, n, mean_dot) + to_float(rv.v[j]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float n = to_float(xv.v[j]) * rs;
      const float dn = to_float(gv.v[j]) * to_float(wv.v[j]);
      out.v[j] = from_float<TX>(rms_norm_dx(rs, dn, n, mean_dot));
    }
  }
  store_pack<TX, V>(dx, out);
}

// Block b handles rows b, b + P, b + 2P, ... (P = gridDim.x = partial_rows); its rpb row
// groups take successive ones. Each group keeps the packs of x and dy of its current row in
// registers (the first NV per thread; the rest are re-read in pass 2) and sums its dweight
// contributions in its own [cols] float32 row of shared memory (acc_in_smem), or, for rows
// too long for shared memory (then rpb == 1), directly in the block's partial row, which
// no other block touches. Threads only read-modify-write the columns they own, so the
// sums need no atomics; at the end the groups' rows are added in a fixed order and
// dw_partial[b, :] is written completely (zeros when the block had no rows): dweight is
// bitwise reproducible.
template <typename TX, typename TW, int V, int NV>
__global__ void __launch_bounds__(kBwdMaxThreads, kBwdBlocksPerSm)
rms_norm_bwd_kernel(const TW* __restrict__ dy, const TX* __restrict__ x, std::int64_t x_stride,
                    const TW* __restrict__ w, const float* __restrict__ rstd,
                    const TX* __restrict__ dres, TX* __restrict__ dx, float* __restrict__ dwp,
                    std::int64_t rows, int cols, int tpr, int rpb, bool acc_in_smem) {
  __shared__ float red[32];
  extern __shared__ float4 dyn_smem[];  // [rpb, cols] floats when acc_in_smem
  float* dw_smem = reinterpret_cast<float*>(dyn_smem);
  const int nvec = cols / V;
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const std::int64_t parts = gridDim.x;
  float* dw_row = dwp + static_cast<std::int64_t>(blockIdx.x) * cols;
  float* acc = acc_in_smem ? dw_smem + group * cols : dw_row;

  const int acc_len = acc_in_smem ? rpb * cols : cols;
  float* acc_all = acc_in_smem ? dw_smem : dw_row;
  for (int c = threadIdx.x; c < acc_len; c += blockDim.x) acc_all[c] = 0.0f;
  __syncthreads();

  for (std::int64_t t = 0; blockIdx.x + t * rpb * parts < rows; ++t) {
    const std::int64_t row = blockIdx.x + (t * rpb + group) * parts;
    const bool active = row < rows;
    const TX* xr = x + row * x_stride;
    const TW* gr = dy + row * cols;
    Pack<TX, V> xc[NV];
    Pack<TW, V> gc[NV];
    float rs = 0.0f;
    float dot = 0.0f;
    if (active) {
      rs = rstd[row];
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) {
          xc[k] = load_pack<TX, V>(xr + i * V);
          gc[k] = load_pack<TW, V>(gr + i * V);
        }
      }
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) dot += bwd_dot<TX, TW, V>(xc[k], gc[k], w + i * V, rs, acc + i * V);
      }
      for (int i = lane + NV * tpr; i < nvec; i += tpr) {
        dot += bwd_dot<TX, TW, V>(load_pack<TX, V>(xr + i * V), load_pack<TW, V>(gr + i * V),
                                  w + i * V, rs, acc + i * V);
      }
    }
    dot = group_sum(dot, tpr, red);
    if (active) {
      const float mean_dot = dot / static_cast<float>(cols);
      const TX* drr = dres == nullptr ? nullptr : dres + row * cols;
      TX* dxr = dx + row * cols;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int i = lane + k * tpr;
        if (i < nvec) {
          bwd_store<TX, TW, V>(xc[k], gc[k], w + i * V, drr == nullptr ? nullptr : drr + i * V,
                               dxr + i * V, rs, mean_dot);
        }
      }
      for (int i = lane + NV * tpr; i < nvec; i += tpr) {
        bwd_store<TX, TW, V>(load_pack<TX, V>(xr + i * V), load_pack<TW, V>(gr + i * V),
                             w + i * V, drr == nullptr ? nullptr : drr + i * V, dxr + i * V, rs,
                             mean_dot);
      }
    }
  }

  if (acc_in_smem) {
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      float s = 0.0f;
      for (int g = 0; g < rpb; ++g) s += dw_smem[g * cols + c];
      dw_row[c] = s;
    }
  }
}

template <typename TX, typename TW, int V>
void launch_forward(ptr x, std::int64_t x_stride, ptr weight, ptr y, ptr rstd,
                    std::int64_t rows, std::int64_t cols, double eps, cudaStream_t stream) {
  const RowConfig cfg = row_config(cols / V, kFwdCache, kFwdBlock, 1024);
  const unsigned grid = grid_for(ceil_div(rows, cfg.rpb), cfg.threads);
  rms_norm_fwd_kernel<TX, TW, V, kFwdCache><<<grid, cfg.threads, 0, stream>>>(
      reinterpret_cast<const TX*>(x), x_stride, reinterpret_cast<const TW*>(weight),
      reinterpret_cast<TW*>(y), reinterpret_cast<float*>(rstd), rows, static_cast<int>(cols),
      cfg.tpr, cfg.rpb, eps);
  QWEN3_FAST_CHECK_LAUNCH("rms_norm_forward");
}

template <typename TX, typename TW, int V>
void launch_backward(ptr dy, ptr x, std::int64_t x_stride, ptr weight, ptr rstd,
                     ptr d_residual, ptr dx, ptr dw_partial, std::int64_t partial_rows,
                     std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
  constexpr int NV = kBwdCache;
  const RowConfig cfg = row_config(cols / V, NV, kBwdMaxThreads, kBwdMaxThreads);
  // rpb > 1 only when tpr <= 64, and then the row fits the register cache (tpr * NV >=
  // cols / V), so rpb * cols <= kBwdMaxThreads * NV * V floats: 16 KiB at most.
  const std::size_t smem = static_cast<std::size_t>(cfg.rpb) * cols * sizeof(float);
  const bool acc_in_smem = smem <= kBwdSmemBytes;
  if (!acc_in_smem && cfg.rpb != 1) throw std::logic_error("rms_norm_backward: bad row config");
  rms_norm_bwd_kernel<TX, TW, V, NV>
      <<<static_cast<unsigned>(partial_rows), cfg.threads, acc_in_smem ? smem : 0, stream>>>(
          reinterpret_cast<const TW*>(dy), reinterpret_cast<const TX*>(x), x_stride,
          reinterpret_cast<const TW*>(weight), reinterpret_cast<const float*>(rstd),
          reinterpret_cast<const TX*>(d_residual), reinterpret_cast<TX*>(dx),
          reinterpret_cast<float*>(dw_partial), rows, static_cast<int>(cols), cfg.tpr, cfg.rpb,
          acc_in_smem);
  QWEN3_FAST_CHECK_LAUNCH("rms_norm_backward");
}

}  // namespace

// x: [rows, cols] with row stride x_stride (unit column stride), weight: [cols]
// -> y: [rows, cols] contiguous in weight's dtype, rstd: [rows] float32.
void rms_norm_forward(ptr x, std::int64_t x_stride, ptr weight, ptr y, ptr rstd,
                      std::int64_t rows, std::int64_t cols, double eps, int x_dtype,
                      int w_dtype, ptr stream) {
  check_norm_sizes(rows, cols);
  check_row_stride(rows, x_stride, cols, "x");
  if (rows == 0) return;
  check_ptr(x, "x"); check_ptr(weight, "weight"); check_ptr(y, "y"); check_ptr(rstd, "rstd");
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    constexpr int V = 16 / sizeof(TX);
    const bool vec = cols % V == 0 && aligned16(x) && (rows == 1 || x_stride % V == 0) &&
                     aligned16(weight) && aligned16(y);
    if (vec) {
      launch_forward<TX, TW, V>(x, x_stride, weight, y, rstd, rows, cols, eps, as_stream(stream));
    } else {
      launch_forward<TX, TW, 1>(x, x_stride, weight, y, rstd, rows, cols, eps, as_stream(stream));
    }
  });
}

// dy: [rows, cols] contiguous, weight dtype; x: [rows, cols] row stride x_stride; weight:
// [cols]; rstd: [rows] float32 (from the forward); d_residual: optional (0) [rows, cols]
// contiguous, x dtype, added to dx -> dx: [rows, cols] contiguous, x dtype;
// dw_partial: [partial_rows, cols] float32, every element written (sum over dim 0 = dw).
void rms_norm_backward(ptr dy, ptr x, std::int64_t x_stride, ptr weight, ptr rstd,
                       ptr d_residual, ptr dx, ptr dw_partial, std::int64_t partial_rows,
                       std::int64_t rows, std::int64_t cols, int x_dtype, int w_dtype,
                       ptr stream) {
  check_norm_sizes(rows, cols);
  check_row_stride(rows, x_stride, cols, "x");
  check_arg(partial_rows >= 1 && partial_rows <= INT32_MAX,
            "partial_rows must be in [1, 2^31 - 1], got " + std::to_string(partial_rows));
  check_ptr(dw_partial, "dw_partial");
  if (rows == 0) {  // no kernel; the partial rows must still read as zeros
    check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(dw_partial), 0,
                               static_cast<std::size_t>(partial_rows * cols) * sizeof(float),
                               as_stream(stream)),
               "rms_norm_backward: cudaMemsetAsync(dw_partial)");
    return;
  }
  check_ptr(dy, "dy"); check_ptr(x, "x"); check_ptr(weight, "weight"); check_ptr(rstd, "rstd");
  check_ptr(dx, "dx");
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    constexpr int V = 16 / sizeof(TX);
    const bool vec = cols % V == 0 && aligned16(x) && (rows == 1 || x_stride % V == 0) &&
                     aligned16(dy) && aligned16(weight) && aligned16(dx) &&
                     aligned16(dw_partial) && (d_residual == 0 || aligned16(d_residual));
    if (vec) {
      launch_backward<TX, TW, V>(dy, x, x_stride, weight, rstd, d_residual, dx, dw_partial,
                                 partial_rows, rows, cols, as_stream(stream));
    } else {
      launch_backward<TX, TW, 1>(dy, x, x_stride, weight, rstd, d_residual, dx, dw_partial,
                                 partial_rows, rows, cols, as_stream(stream));
    }
  });
}

}  // namespace qwen3_fast::cuda
