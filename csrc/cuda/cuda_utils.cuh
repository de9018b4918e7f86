// Helpers shared by the CUDA kernels in csrc/cuda/: storage-type conversions (rounding like
// PyTorch: round-to-nearest-even), 16-byte packs for vectorized loads/stores, warp and
// thread-group reductions, dtype dispatch (the CUDA twin of csrc/cpu/cpu_math.h), launch
// error checks and the row-to-thread mapping of the row-wise norm kernels.
// Free of torch: kernels see raw pointers, sizes and dtype codes (DESIGN.md, "Binding").
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "qwen3_fast/common.h"
#include "qwen3_fast/norm_act_math.h"

namespace qwen3_fast::cuda {

// ------------------------------------------------------------------ errors
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// After a <<<...>>> launch: configuration errors (and sticky errors from earlier work in
// this runtime) become std::runtime_error (RuntimeError in Python). No synchronization.
#define QWEN3_FAST_CHECK_LAUNCH(what) \
  ::qwen3_fast::cuda::check_cuda(cudaGetLastError(), "CUDA kernel launch failed in " what)

inline cudaStream_t as_stream(std::uintptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

inline bool aligned16(std::uintptr_t p) { return (p & 15u) == 0; }

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Multiprocessor count of the current device, cached (a host attribute query, no sync).
inline int sm_count() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  count = std::max(count, 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(count, std::memory_order_relaxed);
  return count;
}

// Grid size for a grid-stride loop over `work` blocks' worth of work: at most kWaves full
// waves of `threads`-thread blocks (2048 resident threads per SM on sm_80/sm_90). Several
// waves keep the tail small when fewer blocks than estimated fit on an SM.
inline unsigned grid_for(std::int64_t work_blocks, int threads) {
  constexpr std::int64_t kWaves = 8;
  const std::int64_t per_sm = std::max(1, 2048 / threads);
  const std::int64_t cap = static_cast<std::int64_t>(sm_count()) * per_sm * kWaves;
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min(work_blocks, cap)));
}

// ------------------------------------------------------------------ dtype dispatch
template <typename T> struct Type { using type = T; };

// Calls f(Type<T>{}) with the CUDA storage type of a dtype code.
template <typename F>
inline void dispatch_dtype(int code, const char* arg, F&& f) {
  switch (check_dtype(code, arg)) {
    case DType::kFloat32: f(Type<float>{}); break;
    case DType::kFloat16: f(Type<__half>{}); break;
    case DType::kBFloat16: f(Type<__nv_bfloat16>{}); break;
  }
}

// Activation x with a weight: the weight has x's dtype or float32 (output: weight dtype).
template <typename F>
inline void dispatch_x_w(int x_code, int w_code, F&& f) {
  dispatch_dtype(x_code, "x", [&](auto tx) {
    if (w_code == x_code) {
      f(tx, tx);
    } else if (w_code == static_cast<int>(DType::kFloat32)) {
      f(tx, Type<float>{});
    } else {
      throw std::invalid_argument(std::string("weight: dtype ") + dtype_name(w_code) +
                                  " must equal the activation dtype " + dtype_name(x_code) +
                                  " or be float32");
    }
  });
}

// ------------------------------------------------------------------ conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round through a storage type and back: HF casts intermediates to the model dtype.
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// ------------------------------------------------------------------ packs
// N consecutive elements moved as 16-byte transactions when N * sizeof(T) is a multiple
// of 16 (the caller guarantees 16-byte alignment then), else element by element.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ std::uint32_t bits32(float v) { return __float_as_uint(v); }
__device__ __forceinline__ std::uint32_t bits32(__half lo, __half hi) {
  return static_cast<std::uint32_t>(__half_as_ushort(lo)) |
         (static_cast<std::uint32_t>(__half_as_ushort(hi)) << 16);
}
__device__ __forceinline__ std::uint32_t bits32(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<std::uint32_t>(__bfloat16_as_ushort(lo)) |
         (static_cast<std::uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  Pack<T, N> r;
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  if constexpr (kBytes % 16 == 0) {
    // Whole uint4 words in and out of memory; memcpy between words and elements folds into
    // register moves and keeps the access one 16-byte instruction.
    uint4 words[kBytes / 16];
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) words[k] = reinterpret_cast<const uint4*>(p)[k];
    memcpy(&r, words, kBytes);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = p[k];
  }
  return r;
}

// One 16-byte global store. Inline PTX because the compiler splits some uint4 stores
// (those through a pointer offset by a runtime element count) into four 4-byte stores.
// The memory clobber keeps later loads of the same address (add_rms_norm reads back
// new_residual) after it.
__device__ __forceinline__ void st_global_16(void* p, uint4 w) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y),
               "r"(w.z), "r"(w.w)
               : "memory");
#else  // host compilation pass (never executed), or a host-side emulation of the kernels
  *reinterpret_cast<uint4*>(p) = w;
#endif
}

// kGlobal: p is global memory (16-byte stores as st.global.v4); else any address space.
template <typename T, int N, bool kGlobal = true>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& r) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  if constexpr (kBytes % 16 == 0) {
    // Words assembled with integer ops (a memcpy'd array gets split into 2-byte stores).
    constexpr int kPer = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) {
      uint4 w;
      if constexpr (kPer == 4) {
        w = make_uint4(bits32(r.v[4 * k]), bits32(r.v[4 * k + 1]), bits32(r.v[4 * k + 2]),
                       bits32(r.v[4 * k + 3]));
      } else {
        w = make_uint4(bits32(r.v[8 * k], r.v[8 * k + 1]), bits32(r.v[8 * k + 2], r.v[8 * k + 3]),
                       bits32(r.v[8 * k + 4], r.v[8 * k + 5]),
                       bits32(r.v[8 * k + 6], r.v[8 * k + 7]));
      }
      if constexpr (kGlobal) {
        st_global_16(reinterpret_cast<uint4*>(p) + k, w);
      } else {
        reinterpret_cast<uint4*>(p)[k] = w;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = r.v[k];
  }
}

// ------------------------------------------------------------------ reductions
// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp
// must call it (full-mask shuffles), each gets its group's sum.
__device__ __forceinline__ float warp_sum(float v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the `tpr` consecutive threads of one row group (block = groups of tpr threads;
// tpr a power of two <= 32, or a multiple of 32). Every thread of the block must call it
// with the same tpr; it synchronizes the block when tpr > 32. smem: 32 floats.
__device__ __forceinline__ float group_sum(float v, int tpr, float* smem) {
  if (tpr <= 32) return warp_sum(v, tpr);
  v = warp_sum(v, 32);
  if ((threadIdx.x & 31u) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  const int warps = tpr >> 5;
  const int first = static_cast<int>(threadIdx.x) / tpr * warps;
  float s = 0.0f;
  for (int k = 0; k < warps; ++k) s += smem[first + k];  // same order in every thread
  __syncthreads();  // smem is reused by the next call
  return s;
}

// ------------------------------------------------------------------ row-wise norms
// A row of `nvec` packs is handled by a group of `tpr` threads; thread `lane` holds packs
// lane, lane + tpr, ... (up to `nv` of them in registers, the rest re-read). Groups of a
// warp or less are powers of two (shuffle-only reduction, several rows per block); larger
// groups are whole warps. rpb groups (rows) share a block of ~block_target threads.
struct RowConfig {
  int tpr;      // threads per row
  int rpb;      // rows per block
  int threads;  // block size = tpr * rpb
};

// tpr: enough threads for `nv` packs each, at most max_tpr (a multiple of 32; longer rows
// loop); rpb: as many rows as fill block_target threads.
inline RowConfig row_config(std::int64_t nvec, int nv, int block_target, int max_tpr) {
  const std::int64_t per = ceil_div(nvec, nv);
  int tpr = 1;
  if (per <= 32) {
    while (tpr < per) tpr <<= 1;
  } else {
    tpr = static_cast<int>(std::min<std::int64_t>(max_tpr, ceil_div(per, 32) * 32));
  }
  const int rpb = std::max(1, block_target / tpr);
  return {tpr, rpb, tpr * rpb};
}

template <typename T, int V>
__device__ __forceinline__ float sum_squares(const Pack<T, V>& p) {
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float v = to_float(p.v[j]);
    s += v * v;
  }
  return s;
}

// y = weight * round_to<TX>(x * rstd), in the weight's dtype (HF Qwen3RMSNorm order).
template <typename TX, typename TW, int V>
__device__ __forceinline__ void normalize_store(const Pack<TX, V>& xv, const TW* w, TW* y,
                                                float rstd) {
  const Pack<TW, V> wv = load_pack<TW, V>(w);
  Pack<TW, V> out;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float n = round_to<TX>(to_float(xv.v[j]) * rstd);
    out.v[j] = from_float<TW>(to_float(wv.v[j]) * n);
  }
  store_pack<TW, V>(y, out);
}

// Size checks shared by the norm launchers (as the CPU launchers, plus the int32 column
// index the kernels use).
inline void check_norm_sizes(std::int64_t rows, std::int64_t cols) {
  check_arg(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  check_arg(cols > 0, "cols must be > 0, got " + std::to_string(cols));
  check_arg(cols <= INT32_MAX, "cols must be < 2^31, got " + std::to_string(cols));
}

inline void check_row_stride(std::int64_t rows, std::int64_t stride, std::int64_t min_stride,
                             const char* arg) {
  check_arg(rows <= 1 || stride >= min_stride,
            std::string(arg) + " row stride " + std::to_string(stride) +
                " is smaller than " + std::to_string(min_stride));
}

}  // namespace qwen3_fast::cuda
