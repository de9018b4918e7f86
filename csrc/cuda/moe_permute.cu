// MoE token permutation on the GPU: same layout and order as csrc/cpu/moe_permute.cpp
// (slot s = t * top_k + k; row_map[s] = the slot's row in the expert-sorted buffer, rows of
// one expert in slot order, i.e. a stable sort; offsets [E+1]). No host synchronization: the
// sort is three kernels on the stream over chunks of kSortChunk slots:
//   1. count: per chunk, a shared-memory histogram -> counts[chunk][e];
//   2. scan (one block): offsets[e] = exclusive scan of the expert totals, and counts[c][e]
//      becomes the first row of chunk c's slots of expert e (offsets[e] + the slots of
//      expert e in earlier chunks);
//   3. scatter: one warp per chunk walks its slots in order, 32 at a time; lanes with the
//      same expert (__match_any_sync) take consecutive rows in lane order, so the order is
//      the slot order, deterministic run to run (and so are the weight gradients' sums).
// Expert ids are trusted here (ops/moe_permute.py checks them; moe_experts gets them
// from top-k).
#include "cuda_utils.cuh"
#include "kernels.h"

namespace qwen3_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kSortChunk = 1024;  // ops/moe_permute.py CUDA_SORT_CHUNK
constexpr std::int64_t kMaxSortExperts = 4096;  // per-expert shared cursors: 32 KiB

__global__ void moe_count_kernel(const std::int64_t* __restrict__ ids,
                                 std::int64_t* __restrict__ counts, std::int64_t slots,
                                 std::int64_t num_experts) {
  extern __shared__ int hist[];  // [num_experts]
  for (std::int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const std::int64_t begin = blockIdx.x * kSortChunk;
  const std::int64_t end = begin + kSortChunk < slots ? begin + kSortChunk : slots;
  for (std::int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) atomicAdd(&hist[ids[s]], 1);
  __syncthreads();
  std::int64_t* row = counts + blockIdx.x * num_experts;
  for (std::int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) row[e] = hist[e];
}

// One block. Thread e (strided) owns expert e's column of counts [chunks, E].
__global__ void moe_sort_scan_kernel(std::int64_t* __restrict__ counts,
                                     std::int64_t* __restrict__ offsets, std::int64_t chunks,
                                     std::int64_t num_experts) {
  for (std::int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    std::int64_t run = 0;
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::int64_t n = counts[c * num_experts + e];
      counts[c * num_experts + e] = run;  // earlier chunks' slots of expert e
      run += n;
    }
    offsets[e] = run;  // the total, scanned below
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    std::int64_t run = 0;
    for (std::int64_t e = 0; e < num_experts; ++e) {
      const std::int64_t n = offsets[e];
      offsets[e] = run;
      run += n;
    }
    offsets[num_experts] = run;
  }
  __syncthreads();
  for (std::int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    for (std::int64_t c = 0; c < chunks; ++c) counts[c * num_experts + e] += offsets[e];
  }
}

// One warp per chunk.
__global__ void moe_sort_scatter_kernel(const std::int64_t* __restrict__ ids,
                                        const std::int64_t* __restrict__ counts,
                                        std::int64_t* __restrict__ row_map, std::int64_t slots,
                                        std::int64_t num_experts) {
  extern __shared__ std::int64_t cursor[];  // [num_experts]: the next row of each expert
  const int lane = threadIdx.x;
  const std::int64_t* base = counts + blockIdx.x * num_experts;
  for (std::int64_t e = lane; e < num_experts; e += 32) cursor[e] = base[e];
  __syncwarp();
  const std::int64_t begin = blockIdx.x * kSortChunk;
  const std::int64_t end = begin + kSortChunk < slots ? begin + kSortChunk : slots;
  const unsigned lower = (1u << lane) - 1u;  // lanes before this one
  for (std::int64_t s0 = begin; s0 < end; s0 += 32) {
    const std::int64_t s = s0 + lane;
    const bool valid = s < end;
    const std::int64_t id = valid ? ids[s] : -1 - lane;  // invalid lanes match nobody
    const unsigned peers = __match_any_sync(0xffffffffu, id);
    if (valid) row_map[s] = cursor[id] + __popc(peers & lower);
    __syncwarp();
    if (valid && (peers & lower) == 0) cursor[id] += __popc(peers);  // the group's first lane
    __syncwarp();
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

void moe_sort(ptr expert_ids, ptr offsets, ptr row_map, ptr workspace,
              std::int64_t workspace_elems, std::int64_t slots, std::int64_t num_experts,
              ptr stream) {
  check_arg(slots >= 0, "slots must be >= 0, got " + std::to_string(slots));
  check_arg(num_experts > 0 && num_experts <= kMaxSortExperts,
            "num_experts must be in [1, " + std::to_string(kMaxSortExperts) + "] on CUDA, got " +
                std::to_string(num_experts));
  const std::int64_t chunks = ceil_div(slots, kSortChunk);
  check_arg(workspace_elems >= chunks * num_experts,
            "moe_sort: workspace has " + std::to_string(workspace_elems) +
                " int64 elements; expected ceil(slots / " + std::to_string(kSortChunk) +
                ") * num_experts = " + std::to_string(chunks * num_experts));
  check_ptr(offsets, "offsets");
  auto st = as_stream(stream);
  const auto* ids = reinterpret_cast<const std::int64_t*>(expert_ids);
  auto* counts = reinterpret_cast<std::int64_t*>(workspace);
  if (chunks > 0) {
    check_ptr(expert_ids, "expert_ids"); check_ptr(row_map, "row_map");
    check_ptr(workspace, "workspace");
    check_arg(chunks < (std::int64_t{1} << 31), "moe_sort: too many slots for one grid");
    moe_count_kernel<<<static_cast<unsigned>(chunks), kThreads,
                       sizeof(int) * num_experts, st>>>(ids, counts, slots, num_experts);
    QWEN3_FAST_CHECK_LAUNCH("moe_sort (count)");
  }
  const int scan_threads = static_cast<int>(std::min<std::int64_t>(1024, ceil_div(num_experts, 32) * 32));
  moe_sort_scan_kernel<<<1, scan_threads, 0, st>>>(
      counts, reinterpret_cast<std::int64_t*>(offsets), chunks, num_experts);
  QWEN3_FAST_CHECK_LAUNCH("moe_sort (scan)");
  if (chunks > 0) {
    moe_sort_scatter_kernel<<<static_cast<unsigned>(chunks), 32,
                              sizeof(std::int64_t) * num_experts, st>>>(
        ids, counts, reinterpret_cast<std::int64_t*>(row_map), slots, num_experts);
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
