// Grouped GEMM for Hopper (sm_90a) with CUTLASS 3.x: a persistent, warp-specialized
// kernel (TMA loads, wgmma; one producer warp group feeds two consumer warp groups, see
// Cooperative/Pingpong below) over a "ptr-array" problem:
// group g multiplies its own A_g, B_g into D_g with its own problem shape (M_g, N, K).
//
//   forward:  c[rows of g] = a[rows of g] @ B_g,  B_g = b[g] ([K, N], N-major) or b[g]^T
//             (trans_b: b[g] is [N, K], K-major); rows outside [offsets[0], offsets[E]) = 0.
//   wgrad:    out[g] = x_g^T @ y_g (x [m, p], y [m, q] row-major): A_g = x_g^T is M-major,
//             B_g = y_g is N-major, and the reduction length K_g is the group's row count.
//
// No host synchronization: the host knows only m, n, k and the group count E. A small
// kernel (prepare_*) reads the E+1 device offsets and writes, per group, the problem shape,
// the A/B/D pointers and strides into a caller-provided workspace; CUTLASS's group tile
// scheduler then reads those device arrays (it is told there are no host problem shapes, so
// it launches one CTA per SM and walks the groups' tiles; empty groups have no tiles). The
// same prepare kernel zero-fills the output rows no group owns (forward) and the weight
// gradients of empty groups (wgrad: a K_g = 0 group gets M = 0, i.e. no tiles, instead).
//
// Requirements checked here (std::invalid_argument otherwise): float16/bfloat16, n and k
// multiples of 8 and 16-byte aligned base pointers (TMA needs 16-byte aligned addresses
// and row pitches; every A_g/D_g row offset is then aligned too), sizes < 2^31. The
// device must be compute capability 9.0 and the build must contain sm_90a code
// (QWEN3_FAST_CUDA_ARCHS with 90a): std::runtime_error otherwise. The kernel body exists
// only in the sm_90a device pass (__CUDA_ARCH_FEAT_SM90_ALL); built without CUTLASS
// (QWEN3_FAST_WITH_CUTLASS undefined) the launchers report the kernel unavailable.
//
// Kernel instances: 2 dtypes x (2 forward layouts x 2 schedules + 1 wgrad layout) = 10
// (cluster 1x1, stages sized by CUTLASS); each costs nvcc time, and CI compiles
// everything on 2 cores, so there is no further tuning space here.
#include "cuda_utils.cuh"
#include "kernels.h"

#if defined(QWEN3_FAST_WITH_CUTLASS)
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>
// tensormap.replace (per-group TMA descriptors on the device) needs CUDA >= 12.3
#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#define QWEN3_FAST_SM90_GROUPED 1
#endif
#endif

#include <cstring>

namespace qwen3_fast::cuda {

#if defined(QWEN3_FAST_SM90_GROUPED)
namespace {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using GroupShape = ProblemShape::UnderlyingProblemShape;  // (M_g, N_g, K_g)

constexpr int kAlign = 8;  // elements of a 16-bit type per 16 bytes: TMA's minimum
constexpr int kPrepThreads = 256;

// Two schedules. Cooperative: 128-row tiles, the two consumer warp groups split each
// tile's rows. Pingpong: 64-row tiles, the two consumer warp groups alternate tiles (one
// runs its epilogue while the other multiplies). MoE groups are small (Qwen3-30B-A3B at
// 512 tokens: 32 rows per expert on average), where a 128-row tile is mostly padding, so
// the forward takes Pingpong when the average group has <= kSmallGroupRows rows (a
// heuristic from tile occupancy, not yet measured on a GPU). The wgrad's M is a weight
// dimension (768..2048): always Cooperative.
struct Cooperative {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct Pingpong {
  using TileShape = cute::Shape<cute::_64, cute::_128, cute::_64>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};
constexpr std::int64_t kSmallGroupRows = 64;

// The kernel type for one element type, one pair of operand layouts (CUTLASS tags:
// RowMajor A = K-major; B RowMajor = N-major, ColumnMajor = K-major; pointer tags mean
// one stride per group) and one schedule. D is row-major; there is no C operand (void:
// D = acc).
template <typename Element, typename LayoutA, typename LayoutB, typename Schedule = Cooperative>
struct GroupedConfig {
  using TileShape = typename Schedule::TileShape;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using LayoutD = cutlass::layout::RowMajor;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign, Element, LayoutD*, kAlign, typename Schedule::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  static_assert(sizeof(StrideA) <= 8 && sizeof(StrideB) <= 8 && sizeof(StrideD) <= 8,
                "one dynamic 64-bit stride per operand expected");
};

// The per-group arrays CUTLASS reads, carved out of the caller's workspace.
template <typename Cfg, typename Element>
struct GroupArrays {
  GroupShape* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  typename Cfg::StrideA* sa;
  typename Cfg::StrideB* sb;
  typename Cfg::StrideD* sd;
};

constexpr std::size_t kSection = 256;  // alignment of every workspace section
inline std::size_t round_up(std::size_t v) { return (v + kSection - 1) / kSection * kSection; }
// Bytes of the per-group arrays: a shape, three pointers and three 8-byte strides.
inline std::size_t arrays_bytes(std::int64_t groups) {
  const auto g = static_cast<std::size_t>(groups);
  return round_up(g * sizeof(GroupShape)) + 6 * round_up(g * 8);
}

template <typename Cfg, typename Element>
GroupArrays<Cfg, Element> carve(std::uintptr_t base, std::int64_t groups) {
  const auto g = static_cast<std::size_t>(groups);
  auto take = [&](std::size_t bytes) {
    const std::uintptr_t p = base;
    base += round_up(bytes);
    return p;
  };
  GroupArrays<Cfg, Element> r;
  r.shapes = reinterpret_cast<GroupShape*>(take(g * sizeof(GroupShape)));
  r.a = reinterpret_cast<const Element**>(take(g * 8));
  r.b = reinterpret_cast<const Element**>(take(g * 8));
  r.d = reinterpret_cast<Element**>(take(g * 8));
  r.sa = reinterpret_cast<typename Cfg::StrideA*>(take(g * 8));
  r.sb = reinterpret_cast<typename Cfg::StrideB*>(take(g * 8));
  r.sd = reinterpret_cast<typename Cfg::StrideD*>(take(g * 8));
  return r;
}

__device__ __forceinline__ std::int64_t clamp64(std::int64_t v, std::int64_t lo,
                                                std::int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Forward: per-group problem (rows of g, n, k) and pointers; zero rows outside every group.
// Offsets are clamped into [0, m] so that bad device offsets cannot address out of bounds.
template <typename Cfg, typename Element>
__global__ void __launch_bounds__(kPrepThreads)
prepare_forward(const std::int64_t* __restrict__ offsets, const Element* a, const Element* b,
                Element* c, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t groups,
                GroupArrays<Cfg, Element> arr) {
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t nthreads = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t g = tid; g < groups; g += nthreads) {
    const std::int64_t lo = clamp64(offsets[g], 0, m);
    const std::int64_t hi = clamp64(offsets[g + 1], lo, m);
    const int rows = static_cast<int>(hi - lo);
    arr.shapes[g] = GroupShape(rows, static_cast<int>(n), static_cast<int>(k));
    arr.a[g] = a + lo * k;
    arr.b[g] = b + g * n * k;
    arr.d[g] = c + lo * n;
    arr.sa[g] = cutlass::make_cute_packed_stride(typename Cfg::StrideA{},
                                                 {rows, static_cast<int>(k), 1});
    arr.sb[g] = cutlass::make_cute_packed_stride(typename Cfg::StrideB{},
                                                 {static_cast<int>(n), static_cast<int>(k), 1});
    arr.sd[g] = cutlass::make_cute_packed_stride(typename Cfg::StrideD{},
                                                 {rows, static_cast<int>(n), 1});
  }
  // Rows [0, first) and [last, m) belong to no group: 16-byte zero stores (n % 8 == 0).
  const std::int64_t first = clamp64(offsets[0], 0, m);
  const std::int64_t last = clamp64(offsets[groups], first, m);
  const std::int64_t vecs = n / kAlign;
  const std::int64_t total = (first + m - last) * vecs;
  for (std::int64_t i = tid; i < total; i += nthreads) {
    const std::int64_t r = i / vecs;
    const std::int64_t row = r < first ? r : last + (r - first);
    st_global_16(c + row * n + (i % vecs) * kAlign, make_uint4(0u, 0u, 0u, 0u));
  }
}

// Wgrad: group g is out[g] ([p, q]) = x_g^T y_g with K_g = its row count. An empty group
// gets M = 0 (no tiles; CUTLASS would store an unreduced accumulator for K = 0) and its
// block zero-fills out[g]. One block per group (grid-stride over groups).
template <typename Cfg, typename Element>
__global__ void __launch_bounds__(kPrepThreads)
prepare_wgrad(const std::int64_t* __restrict__ offsets, const Element* x, const Element* y,
              Element* out, std::int64_t m, std::int64_t p, std::int64_t q, std::int64_t groups,
              GroupArrays<Cfg, Element> arr) {
  for (std::int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const std::int64_t lo = clamp64(offsets[g], 0, m);
    const std::int64_t hi = clamp64(offsets[g + 1], lo, m);
    const int rows = static_cast<int>(hi - lo);
    Element* og = out + g * p * q;
    if (threadIdx.x == 0) {
      arr.shapes[g] = GroupShape(rows > 0 ? static_cast<int>(p) : 0, static_cast<int>(q), rows);
      arr.a[g] = x + lo * p;
      arr.b[g] = y + lo * q;
      arr.d[g] = og;
      arr.sa[g] = cutlass::make_cute_packed_stride(typename Cfg::StrideA{},
                                                   {static_cast<int>(p), rows, 1});
      arr.sb[g] = cutlass::make_cute_packed_stride(typename Cfg::StrideB{},
                                                   {static_cast<int>(q), rows, 1});
      arr.sd[g] = cutlass::make_cute_packed_stride(typename Cfg::StrideD{},
                                                   {static_cast<int>(p), static_cast<int>(q), 1});
    }
    if (rows == 0) {
      const std::int64_t total = p * q / kAlign;
      for (std::int64_t i = threadIdx.x; i < total; i += blockDim.x)
        st_global_16(og + i * kAlign, make_uint4(0u, 0u, 0u, 0u));
    }
  }
}

// The CUTLASS kernel's entry point. Its body is compiled only for sm_90a (wgmma, TMA and
// tensormap.replace are sm_90a features); the sm_80 pass gets an empty kernel that the
// host never launches (grouped_gemm_sm90_* check the device first).
template <typename Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
grouped_gemm_sm90_kernel(CUTLASS_GRID_CONSTANT typename Kernel::Params const params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ char smem[];
  Kernel op;
  op(params, smem);
#endif
}

template <typename Cfg>
typename Cfg::Kernel::Arguments make_arguments(std::int64_t groups, GroupShape* shapes,
                                               const void* a, const void* sa, const void* b,
                                               const void* sb, void* d, const void* sd) {
  using Kernel = typename Cfg::Kernel;
  using EA = typename Kernel::ElementA;
  using EB = typename Kernel::ElementB;
  using ED = typename Kernel::ElementD;
  typename Kernel::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  // no host problem shapes: they live on the device only (written by prepare_*)
  args.problem_shape = ProblemShape{static_cast<int>(groups), shapes, nullptr};
  args.mainloop.ptr_A = reinterpret_cast<const EA**>(const_cast<void*>(a));
  args.mainloop.dA = reinterpret_cast<typename Cfg::StrideA*>(const_cast<void*>(sa));
  args.mainloop.ptr_B = reinterpret_cast<const EB**>(const_cast<void*>(b));
  args.mainloop.dB = reinterpret_cast<typename Cfg::StrideB*>(const_cast<void*>(sb));
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = reinterpret_cast<ED**>(d);
  args.epilogue.dD = reinterpret_cast<typename Cfg::StrideD*>(const_cast<void*>(sd));
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  args.hw_info.device_id = dev;
  args.hw_info.sm_count = sm_count();
  return args;
}

// CUTLASS's own workspace (per-SM TMA descriptor copies) for `groups` groups.
template <typename Cfg>
std::size_t cutlass_workspace(std::int64_t groups) {
  const auto args = make_arguments<Cfg>(groups, nullptr, nullptr, nullptr, nullptr, nullptr,
                                        nullptr, nullptr);
  return Cfg::Kernel::get_workspace_size(args);
}

// Launches the CUTLASS kernel over the group arrays `arr` (already being written by a
// prepare kernel earlier on `stream`); `ws` is the CUTLASS part of the workspace.
template <typename Cfg, typename Element>
void run_grouped(const GroupArrays<Cfg, Element>& arr, std::int64_t groups, void* ws,
                 cudaStream_t stream, const char* what) {
  using Kernel = typename Cfg::Kernel;
  auto args = make_arguments<Cfg>(groups, arr.shapes, arr.a, arr.sa, arr.b, arr.sb, arr.d,
                                  arr.sd);
  if (!Kernel::can_implement(args)) {
    throw std::invalid_argument(std::string(what) + ": CUTLASS cannot implement this problem");
  }
  check_arg(Kernel::initialize_workspace(args, ws, stream) == cutlass::Status::kSuccess,
            std::string(what) + ": CUTLASS workspace initialization failed");
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, ws);
  const dim3 grid = Kernel::get_grid_shape(params);
  const dim3 block = Kernel::get_block_shape();
  constexpr int smem = Kernel::SharedStorageSize;
  // Opt in to > 48 KiB of dynamic shared memory once per device (not per call: a call
  // inside CUDA graph capture then issues nothing but the two launches).
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> smem_set[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices || !smem_set[dev].load(std::memory_order_acquire)) {
    check_cuda(cudaFuncSetAttribute(grouped_gemm_sm90_kernel<Kernel>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(grouped_gemm_sm90_kernel)");
    if (dev >= 0 && dev < kMaxDevices) smem_set[dev].store(true, std::memory_order_release);
  }
  grouped_gemm_sm90_kernel<Kernel><<<grid, block, smem, stream>>>(params);
  check_cuda(cudaGetLastError(), what);
}

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

// Calls f(Type<cutlass element>{}) for a float16/bfloat16 dtype code.
template <typename F>
void dispatch_half(int dtype, const char* what, F&& f) {
  const DType t = check_dtype(dtype, "dtype");
  if (t == DType::kFloat16) {
    f(Type<cutlass::half_t>{});
  } else if (t == DType::kBFloat16) {
    f(Type<cutlass::bfloat16_t>{});
  } else {
    throw std::invalid_argument(std::string(what) + ": dtype " + dtype_name(dtype) +
                                " is not supported (float16 or bfloat16 only)");
  }
}

// The bytes every launcher needs: the largest CUTLASS workspace of the ten kernels plus
// the group arrays (identical sizes for all of them).
template <typename T>
std::size_t cutlass_workspace_max(std::int64_t groups) {
  return std::max({cutlass_workspace<GroupedConfig<T, RowMajor, RowMajor>>(groups),
                   cutlass_workspace<GroupedConfig<T, RowMajor, ColumnMajor>>(groups),
                   cutlass_workspace<GroupedConfig<T, RowMajor, RowMajor, Pingpong>>(groups),
                   cutlass_workspace<GroupedConfig<T, RowMajor, ColumnMajor, Pingpong>>(groups),
                   cutlass_workspace<GroupedConfig<T, ColumnMajor, RowMajor>>(groups)});
}

std::size_t workspace_bytes(std::int64_t groups) {
  const std::size_t cutlass_bytes = std::max(cutlass_workspace_max<cutlass::half_t>(groups),
                                             cutlass_workspace_max<cutlass::bfloat16_t>(groups));
  return round_up(cutlass_bytes) + arrays_bytes(groups);
}

}  // namespace
#endif  // QWEN3_FAST_SM90_GROUPED

bool grouped_gemm_sm90_available() {
#if defined(QWEN3_FAST_SM90_GROUPED) && defined(QWEN3_FAST_BUILD_CUDA_ARCHS)
  // The kernel body exists only when the arch list has 90a: the host pass cannot see the
  // "a", and a plain sm_90 (or PTX JIT from compute_80) build would run an empty body.
  const char* archs = QWEN3_FAST_BUILD_CUDA_ARCHS;
  for (const char* p = archs; *p != '\0';) {
    while (*p == ' ' || *p == ';') ++p;
    if (std::strncmp(p, "90a", 3) == 0) return true;
    while (*p != '\0' && *p != ' ' && *p != ';') ++p;
  }
#endif
  return false;
}

std::int64_t grouped_gemm_sm90_workspace_size(std::int64_t groups) {
  check_arg(groups > 0, "grouped_gemm_sm90: groups must be > 0, got " + std::to_string(groups));
#if defined(QWEN3_FAST_SM90_GROUPED)
  return static_cast<std::int64_t>(workspace_bytes(groups));
#else
  return 0;
#endif
}

namespace {
// Throws unless the sm_90a kernel can run here: built in, and the current device is 9.0.
void require_sm90(const char* what) {
  if (!grouped_gemm_sm90_available()) {
    throw std::runtime_error(
        std::string(what) + ": this build has no sm_90a CUTLASS grouped GEMM (it needs the "
        "CUTLASS headers and 90a in QWEN3_FAST_CUDA_ARCHS)");
  }
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
             "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev),
             "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  if (major != 9 || minor != 0) {
    throw std::runtime_error(std::string(what) + ": needs a compute capability 9.0 GPU "
                             "(Hopper, sm_90a), device " + std::to_string(dev) + " is " +
                             std::to_string(major) + "." + std::to_string(minor));
  }
}

void check_common(const char* what, std::int64_t m, std::int64_t n, std::int64_t k,
                  std::int64_t groups, ptr workspace, std::int64_t workspace_size) {
  const std::string w(what);
  check_arg(m >= 0 && n > 0 && k > 0 && groups > 0,
            w + ": bad sizes m=" + std::to_string(m) + " n=" + std::to_string(n) +
                " k=" + std::to_string(k) + " groups=" + std::to_string(groups));
  check_arg(n % 8 == 0 && k % 8 == 0,
            w + ": n and k must be multiples of 8 (16-byte TMA rows), got n=" +
                std::to_string(n) + " k=" + std::to_string(k));
  check_arg(m < INT32_MAX && n < INT32_MAX && k < INT32_MAX && groups < INT32_MAX,
            w + ": sizes must be < 2^31");
  check_ptr(workspace, "workspace");
  check_arg(aligned16(workspace), w + ": workspace must be 16-byte aligned");
  const std::int64_t need = grouped_gemm_sm90_workspace_size(groups);
  check_arg(workspace_size >= need, w + ": workspace has " + std::to_string(workspace_size) +
                                        " bytes, needs " + std::to_string(need));
}
}  // namespace

void grouped_gemm_sm90(ptr a, ptr b, ptr offsets, ptr c, ptr workspace,
                       std::int64_t workspace_size, std::int64_t m, std::int64_t n,
                       std::int64_t k, std::int64_t groups, bool trans_b, int dtype,
                       ptr stream) {
  constexpr const char* what = "grouped_gemm_sm90";
  require_sm90(what);
  check_common(what, m, n, k, groups, workspace, workspace_size);
  if (m == 0) return;
  check_ptr(a, "a"); check_ptr(b, "b"); check_ptr(offsets, "offsets"); check_ptr(c, "c");
  check_arg(aligned16(a) && aligned16(b) && aligned16(c),
            "grouped_gemm_sm90: a, b and c must be 16-byte aligned");
#if defined(QWEN3_FAST_SM90_GROUPED)
  const cudaStream_t s = as_stream(stream);
  dispatch_half(dtype, what, [&](auto t) {
    using T = typename decltype(t)::type;
    auto launch = [&](auto cfg) {
      using Cfg = decltype(cfg);
      const std::size_t cut = round_up(cutlass_workspace<Cfg>(groups));
      const auto arr = carve<Cfg, T>(workspace + cut, groups);
      // Grid-stride loops: enough threads for the groups, a few blocks per SM for the
      // (usually empty) zero fill.
      const std::int64_t fill_blocks = ceil_div(m * (n / kAlign), kPrepThreads);
      const unsigned grid = static_cast<unsigned>(std::max(
          ceil_div(groups, kPrepThreads),
          std::min<std::int64_t>(fill_blocks, 2 * static_cast<std::int64_t>(sm_count()))));
      prepare_forward<Cfg, T><<<grid, kPrepThreads, 0, s>>>(
          reinterpret_cast<const std::int64_t*>(offsets), reinterpret_cast<const T*>(a),
          reinterpret_cast<const T*>(b), reinterpret_cast<T*>(c), m, n, k, groups, arr);
      QWEN3_FAST_CHECK_LAUNCH("grouped_gemm_sm90 (prepare)");
      run_grouped<Cfg, T>(arr, groups, reinterpret_cast<void*>(workspace), s, what);
    };
    // b[g] [N, K] (trans_b): K-major B (ColumnMajor); b[g] [K, N]: N-major B (RowMajor)
    const bool small = m <= kSmallGroupRows * groups;
    if (trans_b && small) {
      launch(GroupedConfig<T, RowMajor, ColumnMajor, Pingpong>{});
    } else if (trans_b) {
      launch(GroupedConfig<T, RowMajor, ColumnMajor, Cooperative>{});
    } else if (small) {
      launch(GroupedConfig<T, RowMajor, RowMajor, Pingpong>{});
    } else {
      launch(GroupedConfig<T, RowMajor, RowMajor, Cooperative>{});
    }
  });
#endif
}

void grouped_gemm_sm90_wgrad(ptr x, ptr y, ptr offsets, ptr out, ptr workspace,
                             std::int64_t workspace_size, std::int64_t m, std::int64_t p,
                             std::int64_t q, std::int64_t groups, int dtype, ptr stream) {
  constexpr const char* what = "grouped_gemm_sm90_wgrad";
  // p plays the forward's n or k and q the other one: both must be multiples of 8
  require_sm90(what);
  check_common(what, m, q, p, groups, workspace, workspace_size);
  check_ptr(offsets, "offsets"); check_ptr(out, "out");
  if (m > 0) {
    check_ptr(x, "x"); check_ptr(y, "y");
    check_arg(aligned16(x) && aligned16(y),
              "grouped_gemm_sm90_wgrad: x and y must be 16-byte aligned");
  }
  check_arg(aligned16(out), "grouped_gemm_sm90_wgrad: out must be 16-byte aligned");
#if defined(QWEN3_FAST_SM90_GROUPED)
  const cudaStream_t s = as_stream(stream);
  dispatch_half(dtype, what, [&](auto t) {
    using T = typename decltype(t)::type;
    using Cfg = GroupedConfig<T, ColumnMajor, RowMajor>;  // A = x_g^T (M-major), B = y_g
    const std::size_t cut = round_up(cutlass_workspace<Cfg>(groups));
    const auto arr = carve<Cfg, T>(workspace + cut, groups);
    const unsigned grid = grid_for(groups, kPrepThreads);
    prepare_wgrad<Cfg, T><<<grid, kPrepThreads, 0, s>>>(
        reinterpret_cast<const std::int64_t*>(offsets), reinterpret_cast<const T*>(x),
        reinterpret_cast<const T*>(y), reinterpret_cast<T*>(out), m, p, q, groups, arr);
    QWEN3_FAST_CHECK_LAUNCH("grouped_gemm_sm90_wgrad (prepare)");
    run_grouped<Cfg, T>(arr, groups, reinterpret_cast<void*>(workspace), s, what);
  });
#endif
}

}  // namespace qwen3_fast::cuda
