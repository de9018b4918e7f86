// Grouped GEMM on the GPU (any sm_80+): c[rows of g] = a[rows of g] @ B_g with
// B_g = b[g] ([K, N]) or b[g]^T (b[g] is [N, K], trans_b), and its weight gradient
// db[g] = x_g^T @ y_g with a per-group reduction length (the group's rows).
//
// The portable path: shared-memory tiles (64 x 64 outputs per 256-thread block, 4 x 4 per
// thread, fp32 FMA accumulation, one rounding to the output dtype). The grid's row-tile
// axis is an upper bound known without reading offsets (cdiv(M, 64) + E: each group adds
// at most one partial tile); each block walks offsets (E+1 int64 on the device) to find
// its group, so nothing synchronizes with the host. Rows outside [offsets[0], offsets[E])
// are written as zeros by the same launch.
//
// Not here yet (see the issue): the CUTLASS 3.x ptr-array warp-specialized (wgmma/TMA)
// kernel for sm_90a; this tiled kernel is the correctness baseline that path must match.
#include "cuda_utils.cuh"
#include "kernels.h"

namespace qwen3_fast::cuda {
namespace {

constexpr int kTile = 64;   // output tile edge
constexpr int kDepth = 16;  // reduction slice per shared-memory stage
constexpr int kThreads = 256;

// Finds the group owning row tile `tile` (tiles numbered group by group).
__device__ __forceinline__ bool find_group(const std::int64_t* offsets, std::int64_t groups,
                                           std::int64_t tile, std::int64_t* group,
                                           std::int64_t* row0, std::int64_t* row_end) {
  std::int64_t seen = 0;
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t lo = offsets[g], hi = offsets[g + 1];
    const std::int64_t tiles = hi > lo ? (hi - lo + kTile - 1) / kTile : 0;
    if (tile < seen + tiles) {
      *group = g;
      *row0 = lo + (tile - seen) * kTile;
      *row_end = hi;
      return true;
    }
    seen += tiles;
  }
  return false;
}

template <typename T, bool kTransB>
__global__ void __launch_bounds__(kThreads)
grouped_gemm_kernel(const T* __restrict__ a, const T* __restrict__ b,
                    const std::int64_t* __restrict__ offsets, T* __restrict__ c, std::int64_t m,
                    std::int64_t n, std::int64_t k, std::int64_t groups,
                    std::int64_t group_tiles) {
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  if (static_cast<std::int64_t>(blockIdx.x) >= group_tiles) {
    // zero fill of the rows before offsets[0] and after offsets[E]
    const std::int64_t lo = offsets[0], hi = offsets[groups];
    const std::int64_t r0 = (blockIdx.x - group_tiles) * kTile;
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const std::int64_t r = r0 + i / kTile, col = col0 + i % kTile;
      if (r < m && col < n && (r < lo || r >= hi)) c[r * n + col] = from_float<T>(0.0f);
    }
    return;
  }
  std::int64_t group = 0, row0 = 0, row_end = 0;
  if (!find_group(offsets, groups, blockIdx.x, &group, &row0, &row_end)) return;
  const T* bg = b + group * n * k;
  __shared__ float as[kDepth][kTile + 1];
  __shared__ float bs[kDepth][kTile + 1];
  float acc[4][4] = {};
  for (std::int64_t k0 = 0; k0 < k; k0 += kDepth) {
    for (int i = threadIdx.x; i < kTile * kDepth; i += kThreads) {
      const int r = i / kDepth, kk = i % kDepth;  // a tile: row-major rows, k fastest
      const std::int64_t row = row0 + r, kg = k0 + kk;
      as[kk][r] = row < row_end && kg < k ? to_float(a[row * k + kg]) : 0.0f;
      // b tile [kDepth, kTile]: b[g][kg][col] or b[g][col][kg]
      std::int64_t kb, colb;
      if (kTransB) { colb = col0 + i / kDepth; kb = k0 + i % kDepth; }
      else { kb = k0 + i / kTile; colb = col0 + i % kTile; }
      const bool ok = kb < k && colb < n;
      const float v = ok ? to_float(kTransB ? bg[colb * k + kb] : bg[kb * n + colb]) : 0.0f;
      bs[kb - k0][colb - col0] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { av[i] = as[kk][ty * 4 + i]; bv[i] = bs[kk][tx * 4 + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t row = row0 + ty * 4 + i;
    if (row >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t col = col0 + tx * 4 + j;
      if (col < n) c[row * n + col] = from_float<T>(acc[i][j]);
    }
  }
}

// out[g] ([P, Q]) = x[rows of g]^T @ y[rows of g]; x [M, P], y [M, Q]. Grid: (tiles, E).
template <typename T>
__global__ void __launch_bounds__(kThreads)
grouped_wgrad_kernel(const T* __restrict__ x, const T* __restrict__ y,
                     const std::int64_t* __restrict__ offsets, T* __restrict__ out,
                     std::int64_t p, std::int64_t q) {
  const std::int64_t g = blockIdx.y;
  const std::int64_t tiles_q = (q + kTile - 1) / kTile;
  const std::int64_t p0 = (blockIdx.x / tiles_q) * kTile, q0 = (blockIdx.x % tiles_q) * kTile;
  const std::int64_t lo = offsets[g], hi = offsets[g + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  __shared__ float xs[kDepth][kTile + 1];
  __shared__ float ys[kDepth][kTile + 1];
  float acc[4][4] = {};
  for (std::int64_t r0 = lo; r0 < hi; r0 += kDepth) {
    for (int i = threadIdx.x; i < kTile * kDepth; i += kThreads) {
      const int rr = i / kTile, cc = i % kTile;
      const std::int64_t row = r0 + rr;
      xs[rr][cc] = row < hi && p0 + cc < p ? to_float(x[row * p + p0 + cc]) : 0.0f;
      ys[rr][cc] = row < hi && q0 + cc < q ? to_float(y[row * q + q0 + cc]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kDepth; ++rr) {
      float xv[4], yv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { xv[i] = xs[rr][ty * 4 + i]; yv[i] = ys[rr][tx * 4 + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], yv[j], acc[i][j]);
    }
    __syncthreads();
  }
  T* og = out + g * p * q;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t pp = p0 + ty * 4 + i;
    if (pp >= p) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t qq = q0 + tx * 4 + j;
      if (qq < q) og[pp * q + qq] = from_float<T>(acc[i][j]);  // empty group: zeros
    }
  }
}

}  // namespace

void grouped_gemm(ptr a, ptr b, ptr offsets, ptr c, std::int64_t m, std::int64_t n,
                  std::int64_t k, std::int64_t groups, bool trans_b, int dtype, ptr stream) {
  check_arg(m >= 0 && n > 0 && k > 0 && groups > 0,
            "grouped_gemm: bad sizes m=" + std::to_string(m) + " n=" + std::to_string(n) +
                " k=" + std::to_string(k) + " groups=" + std::to_string(groups));
  if (m == 0) return;
  check_ptr(a, "a"); check_ptr(b, "b"); check_ptr(offsets, "offsets"); check_ptr(c, "c");
  const std::int64_t row_tiles = ceil_div(m, kTile);
  const std::int64_t group_tiles = row_tiles + groups;  // upper bound, see the file comment
  check_arg(group_tiles + row_tiles < (std::int64_t{1} << 31) && ceil_div(n, kTile) < 65536,
            "grouped_gemm: problem too large for one grid");
  const dim3 grid(static_cast<unsigned>(group_tiles + row_tiles),
                  static_cast<unsigned>(ceil_div(n, kTile)));
  dispatch_dtype(dtype, "a", [&](auto t) {
    using T = typename decltype(t)::type;
    const auto* ap = reinterpret_cast<const T*>(a);
    const auto* bp = reinterpret_cast<const T*>(b);
    const auto* op = reinterpret_cast<const std::int64_t*>(offsets);
    auto* cp = reinterpret_cast<T*>(c);
    if (trans_b) {
      grouped_gemm_kernel<T, true><<<grid, kThreads, 0, as_stream(stream)>>>(
          ap, bp, op, cp, m, n, k, groups, group_tiles);
    } else {
      grouped_gemm_kernel<T, false><<<grid, kThreads, 0, as_stream(stream)>>>(
          ap, bp, op, cp, m, n, k, groups, group_tiles);
    }
    QWEN3_FAST_CHECK_LAUNCH("grouped_gemm");
  });
}

void grouped_gemm_wgrad(ptr x, ptr y, ptr offsets, ptr out, std::int64_t m, std::int64_t p,
                        std::int64_t q, std::int64_t groups, int dtype, ptr stream) {
  check_arg(m >= 0 && p > 0 && q > 0 && groups > 0,
            "grouped_gemm_wgrad: bad sizes m=" + std::to_string(m) + " p=" + std::to_string(p) +
                " q=" + std::to_string(q) + " groups=" + std::to_string(groups));
  check_ptr(offsets, "offsets"); check_ptr(out, "out");
  if (m > 0) { check_ptr(x, "x"); check_ptr(y, "y"); }
  const std::int64_t tiles = ceil_div(p, kTile) * ceil_div(q, kTile);
  check_arg(tiles < (std::int64_t{1} << 31) && groups < 65536,
            "grouped_gemm_wgrad: problem too large for one grid");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(groups));
  dispatch_dtype(dtype, "x", [&](auto t) {
    using T = typename decltype(t)::type;
    grouped_wgrad_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(y),
        reinterpret_cast<const std::int64_t*>(offsets), reinterpret_cast<T*>(out), p, q);
    QWEN3_FAST_CHECK_LAUNCH("grouped_gemm_wgrad");
  });
}

}  // namespace qwen3_fast::cuda
