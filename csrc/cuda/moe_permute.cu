// MoE token permutation on the GPU: same layout and rounding as csrc/cpu/moe_permute.cpp
// (slot s = t * top_k + k; row_map[s] = the slot's row in the expert-sorted buffer;
// offsets [E+1]). No host synchronization anywhere: the sort is three small kernels on the
// stream (histogram, one-block scan, scatter).
//
// Unlike the CPU sort, rows of one expert are placed in atomic (arrival) order, not token
// order: every output row is still computed from its own token alone and the combine
// reads rows by slot, so y and dx are unaffected; the weight gradients' reduction over an
// expert's rows may differ in the last bits from run to run.
// Expert ids are trusted here (ops/moe_permute.py checks them; moe_experts gets them
// from top-k).
#include "cuda_utils.cuh"
#include "kernels.h"

namespace qwen3_fast::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void moe_histogram_kernel(const std::int64_t* __restrict__ ids,
                                     std::int64_t* __restrict__ counts, std::int64_t slots) {
  for (std::int64_t s = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       s < slots; s += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    atomicAdd(reinterpret_cast<unsigned long long*>(counts + ids[s]), 1ull);
  }
}

// One block: exclusive scan of counts [E] into offsets [E+1]; counts become the cursors.
__global__ void moe_scan_kernel(std::int64_t* __restrict__ counts,
                                std::int64_t* __restrict__ offsets, std::int64_t num_experts) {
  if (threadIdx.x == 0) {
    std::int64_t run = 0;
    for (std::int64_t e = 0; e < num_experts; ++e) {
      offsets[e] = run;
      run += counts[e];
      counts[e] = offsets[e];
    }
    offsets[num_experts] = run;
  }
}

__global__ void moe_scatter_kernel(const std::int64_t* __restrict__ ids,
                                   std::int64_t* __restrict__ cursor,
                                   std::int64_t* __restrict__ row_map, std::int64_t slots) {
  for (std::int64_t s = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       s < slots; s += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    row_map[s] = static_cast<std::int64_t>(
        atomicAdd(reinterpret_cast<unsigned long long*>(cursor + ids[s]), 1ull));
  }
}

// One block per token: its top_k copies (optionally scaled by the rounded weight).
template <typename T>
__global__ void moe_permute_kernel(const T* __restrict__ src, std::int64_t src_stride,
                                   const std::int64_t* __restrict__ row_map,
                                   const float* __restrict__ scale, T* __restrict__ dst,
                                   std::int64_t top_k, std::int64_t cols) {
  const std::int64_t tok = blockIdx.x;
  const T* in = src + tok * src_stride;
  for (std::int64_t k = 0; k < top_k; ++k) {
    const std::int64_t s = tok * top_k + k;
    T* out = dst + row_map[s] * cols;
    const float w = scale == nullptr ? 1.0f : round_to<T>(scale[s]);
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      out[c] = scale == nullptr ? in[c] : from_float<T>(to_float(in[c]) * w);
    }
  }
}

template <typename T>
__global__ void moe_unpermute_kernel(const T* __restrict__ src,
                                     const std::int64_t* __restrict__ row_map,
                                     const float* __restrict__ weights, T* __restrict__ dst,
                                     std::int64_t top_k, std::int64_t cols) {
  const std::int64_t tok = blockIdx.x;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t k = 0; k < top_k; ++k) {
      const std::int64_t s = tok * top_k + k;
      const float v = to_float(src[row_map[s] * cols + c]);
      acc += weights == nullptr ? v : round_to<T>(v * round_to<T>(weights[s]));
    }
    dst[tok * cols + c] = from_float<T>(acc);
  }
}

// One block per slot: d_src row (dy * w) and the float32 dot <dy, src row>.
template <typename T>
__global__ void moe_unpermute_backward_kernel(const T* __restrict__ dy, const T* __restrict__ src,
                                              const std::int64_t* __restrict__ row_map,
                                              const float* __restrict__ weights,
                                              T* __restrict__ d_src, float* __restrict__ d_weights,
                                              std::int64_t top_k, std::int64_t cols) {
  const std::int64_t s = blockIdx.x;
  const std::int64_t tok = s / top_k;
  const std::int64_t row = row_map[s];
  const float w = round_to<T>(weights[s]);
  float dot = 0.0f;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = to_float(dy[tok * cols + c]);
    dot += g * to_float(src[row * cols + c]);
    d_src[row * cols + c] = from_float<T>(g * w);
  }
  __shared__ float partial[kThreads];
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) d_weights[s] = partial[0];
}

void check_sizes(std::int64_t tokens, std::int64_t top_k, std::int64_t cols, const char* what) {
  check_arg(tokens >= 0 && top_k > 0 && cols > 0,
            std::string(what) + ": bad sizes tokens=" + std::to_string(tokens) + " top_k=" +
                std::to_string(top_k) + " cols=" + std::to_string(cols));
  check_arg(tokens < (std::int64_t{1} << 31), std::string(what) + ": too many tokens for one grid");
}

}  // namespace

void moe_sort(ptr expert_ids, ptr offsets, ptr row_map, ptr cursor, std::int64_t slots,
              std::int64_t num_experts, ptr stream) {
  check_arg(slots >= 0, "slots must be >= 0, got " + std::to_string(slots));
  check_arg(num_experts > 0, "num_experts must be > 0, got " + std::to_string(num_experts));
  check_ptr(offsets, "offsets"); check_ptr(cursor, "cursor");
  auto st = as_stream(stream);
  auto* cur = reinterpret_cast<std::int64_t*>(cursor);
  check_cuda(cudaMemsetAsync(cur, 0, sizeof(std::int64_t) * num_experts, st), "cudaMemsetAsync");
  const auto* ids = reinterpret_cast<const std::int64_t*>(expert_ids);
  const unsigned grid = grid_for(ceil_div(std::max<std::int64_t>(slots, 1), kThreads), kThreads);
  if (slots > 0) {
    moe_histogram_kernel<<<grid, kThreads, 0, st>>>(ids, cur, slots);
    QWEN3_FAST_CHECK_LAUNCH("moe_sort (histogram)");
  }
  moe_scan_kernel<<<1, 32, 0, st>>>(cur, reinterpret_cast<std::int64_t*>(offsets), num_experts);
  QWEN3_FAST_CHECK_LAUNCH("moe_sort (scan)");
  if (slots > 0) {
    moe_scatter_kernel<<<grid, kThreads, 0, st>>>(ids, cur,
                                                  reinterpret_cast<std::int64_t*>(row_map), slots);
    QWEN3_FAST_CHECK_LAUNCH("moe_sort (scatter)");
  }
}

void moe_permute(ptr src, std::int64_t src_stride, ptr row_map, ptr scale, ptr dst,
                 std::int64_t tokens, std::int64_t top_k, std::int64_t rows, std::int64_t cols,
                 int dtype, ptr stream) {
  check_sizes(tokens, top_k, cols, "moe_permute");
  check_arg(rows == tokens * top_k, "moe_permute: rows must equal tokens * top_k");
  if (tokens == 0) return;
  check_ptr(src, "src"); check_ptr(row_map, "row_map"); check_ptr(dst, "dst");
  dispatch_dtype(dtype, "src", [&](auto t) {
    using T = typename decltype(t)::type;
    moe_permute_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(src), src_stride,
        reinterpret_cast<const std::int64_t*>(row_map), reinterpret_cast<const float*>(scale),
        reinterpret_cast<T*>(dst), top_k, cols);
    QWEN3_FAST_CHECK_LAUNCH("moe_permute");
  });
}

void moe_unpermute(ptr src, ptr row_map, ptr weights, ptr dst, std::int64_t tokens,
                   std::int64_t top_k, std::int64_t rows, std::int64_t cols, int dtype,
                   ptr stream) {
  check_sizes(tokens, top_k, cols, "moe_unpermute");
  if (tokens == 0) return;
  check_ptr(src, "src"); check_ptr(row_map, "row_map"); check_ptr(dst, "dst");
  dispatch_dtype(dtype, "src", [&](auto t) {
    using T = typename decltype(t)::type;
    moe_unpermute_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(src), reinterpret_cast<const std::int64_t*>(row_map),
        reinterpret_cast<const float*>(weights), reinterpret_cast<T*>(dst), top_k, cols);
    QWEN3_FAST_CHECK_LAUNCH("moe_unpermute");
  });
}

void moe_unpermute_backward(ptr dy, ptr src, ptr row_map, ptr weights, ptr d_src,
                            ptr d_weights, std::int64_t tokens, std::int64_t top_k,
                            std::int64_t rows, std::int64_t cols, int dtype, ptr stream) {
  check_sizes(tokens, top_k, cols, "moe_unpermute_backward");
  check_arg(rows == tokens * top_k, "moe_unpermute_backward: rows must equal tokens * top_k");
  if (tokens == 0) return;
  check_ptr(dy, "dy"); check_ptr(src, "src"); check_ptr(row_map, "row_map");
  check_ptr(weights, "weights"); check_ptr(d_src, "d_src"); check_ptr(d_weights, "d_weights");
  dispatch_dtype(dtype, "src", [&](auto t) {
    using T = typename decltype(t)::type;
    moe_unpermute_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0,
                                       as_stream(stream)>>>(
        reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(src),
        reinterpret_cast<const std::int64_t*>(row_map), reinterpret_cast<const float*>(weights),
        reinterpret_cast<T*>(d_src), reinterpret_cast<float*>(d_weights), top_k, cols);
    QWEN3_FAST_CHECK_LAUNCH("moe_unpermute_backward");
  });
}

}  // namespace qwen3_fast::cuda
