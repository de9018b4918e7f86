// SwiGLU on CUDA: y = silu(gate) * up with gate_up = [gate | up] per row (same math as
// csrc/cpu/silu_and_mul.cpp). Rounds like HF's `act_fn(gate) * up` in the model dtype:
// silu rounded to the storage type, then the product. silu(g) = g / (1 + exp(-g)) with
// IEEE division and expf, as PyTorch's CUDA silu. The backward recomputes silu from
// gate_up instead of saving it.
//
// Elementwise: the [rows, inter] output is one flat index space of 16-byte packs (scalar
// elements when widths, strides or pointers do not allow packs), walked by a grid-stride
// loop; the row of a pack comes from one 32-bit division when the index fits.
#include <type_traits>

#include "cuda/kernels.h"
#include "cuda/cuda_utils.cuh"

namespace qwen3_fast::cuda {

namespace {

constexpr int kThreads = 256;

// gate_up: [rows, 2 * inter] row stride `stride`; y: [rows, inter] contiguous, so pack i of
// the flat index lives at y + i * V. npack: packs per row (inter / V).
template <typename T, int V, typename Index>
__global__ void __launch_bounds__(kThreads)
silu_and_mul_fwd_kernel(const T* __restrict__ gate_up, std::int64_t stride, T* __restrict__ y,
                        Index total, Index npack, std::int64_t inter) {
  const Index step = static_cast<Index>(gridDim.x) * kThreads;
  for (Index i = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const Index row = i / npack;
    const T* g = gate_up + static_cast<std::int64_t>(row) * stride +
                 static_cast<std::int64_t>(i - row * npack) * V;
    const Pack<T, V> gv = load_pack<T, V>(g);
    const Pack<T, V> uv = load_pack<T, V>(g + inter);
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float gf = to_float(gv.v[j]);
      const float a = round_to<T>(silu_from_exp_neg(gf, expf(-gf)));
      out.v[j] = from_float<T>(a * to_float(uv.v[j]));
    }
    store_pack<T, V>(y + static_cast<std::int64_t>(i) * V, out);
  }
}

// dy: [rows, inter] contiguous; d_gate_up: [rows, 2 * inter] contiguous.
template <typename T, int V, typename Index>
__global__ void __launch_bounds__(kThreads)
silu_and_mul_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ gate_up,
                        std::int64_t stride, T* __restrict__ d_gate_up, Index total, Index npack,
                        std::int64_t inter) {
  const Index step = static_cast<Index>(gridDim.x) * kThreads;
  for (Index i = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const Index row = i / npack;
    const std::int64_t col = static_cast<std::int64_t>(i - row * npack) * V;
    const T* g = gate_up + static_cast<std::int64_t>(row) * stride + col;
    T* dg = d_gate_up + static_cast<std::int64_t>(row) * 2 * inter + col;
    const Pack<T, V> dv = load_pack<T, V>(dy + static_cast<std::int64_t>(i) * V);
    const Pack<T, V> gv = load_pack<T, V>(g);
    const Pack<T, V> uv = load_pack<T, V>(g + inter);
    Pack<T, V> dgv;
    Pack<T, V> duv;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float gf = to_float(gv.v[j]);
      const float sig = sigmoid_from_exp_neg(expf(-gf));
      const float d = to_float(dv.v[j]);
      dgv.v[j] = from_float<T>(swiglu_dgate(d, gf, to_float(uv.v[j]), sig));
      duv.v[j] = from_float<T>(swiglu_dup(d, gf, sig));
    }
    store_pack<T, V>(dg, dgv);
    store_pack<T, V>(dg + inter, duv);
  }
}

void check_sizes(std::int64_t rows, std::int64_t inter, std::int64_t stride) {
  check_arg(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  check_arg(inter > 0, "inter must be > 0, got " + std::to_string(inter));
  check_arg(rows <= 1 || stride >= 2 * inter,
            "gate_up row stride " + std::to_string(stride) + " must be >= 2 * inter = " +
                std::to_string(2 * inter));
}

// Calls f(Type<Pack width>, Type<Index>) for the widest pack the layout allows and the
// narrowest index type that holds the flat pack count.
template <int V, typename F>
void dispatch_layout(bool vec, std::int64_t rows, std::int64_t inter, F&& f) {
  const auto go = [&](auto width) {
    constexpr int W = decltype(width)::value;
    const std::int64_t total = rows * (inter / W);
    if (total <= INT32_MAX) {
      f(width, Type<std::uint32_t>{}, total);
    } else {
      f(width, Type<std::uint64_t>{}, total);
    }
  };
  if (vec) {
    go(std::integral_constant<int, V>{});
  } else {
    go(std::integral_constant<int, 1>{});
  }
}

}  // namespace

// gate_up: [rows, 2 * inter] with row stride `stride` (gate columns first, unit column
// stride) -> y: [rows, inter] contiguous, same dtype.
void silu_and_mul_forward(ptr gate_up, std::int64_t stride, ptr y, std::int64_t rows,
                          std::int64_t inter, int dtype, ptr stream) {
  check_sizes(rows, inter, stride);
  if (rows == 0) return;
  check_ptr(gate_up, "gate_up"); check_ptr(y, "y");
  dispatch_dtype(dtype, "gate_up", [&](auto t) {
    using T = typename decltype(t)::type;
    constexpr int V = 16 / sizeof(T);
    const bool vec = inter % V == 0 && aligned16(gate_up) && (rows == 1 || stride % V == 0) &&
                     aligned16(y);
    dispatch_layout<V>(vec, rows, inter, [&](auto width, auto index, std::int64_t total) {
      constexpr int W = decltype(width)::value;
      using Index = typename decltype(index)::type;
      const unsigned grid = grid_for(ceil_div(total, kThreads), kThreads);
      silu_and_mul_fwd_kernel<T, W, Index><<<grid, kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const T*>(gate_up), stride, reinterpret_cast<T*>(y),
          static_cast<Index>(total), static_cast<Index>(inter / W), inter);
      QWEN3_FAST_CHECK_LAUNCH("silu_and_mul_forward");
    });
  });
}

// dy: [rows, inter] contiguous; gate_up: [rows, 2 * inter] with row stride `stride`
// -> d_gate_up: [rows, 2 * inter] contiguous (d gate columns, then d up columns).
void silu_and_mul_backward(ptr dy, ptr gate_up, std::int64_t stride, ptr d_gate_up,
                           std::int64_t rows, std::int64_t inter, int dtype, ptr stream) {
  check_sizes(rows, inter, stride);
  if (rows == 0) return;
  check_ptr(dy, "dy"); check_ptr(gate_up, "gate_up"); check_ptr(d_gate_up, "d_gate_up");
  dispatch_dtype(dtype, "gate_up", [&](auto t) {
    using T = typename decltype(t)::type;
    constexpr int V = 16 / sizeof(T);
    const bool vec = inter % V == 0 && aligned16(gate_up) && (rows == 1 || stride % V == 0) &&
                     aligned16(dy) && aligned16(d_gate_up);
    dispatch_layout<V>(vec, rows, inter, [&](auto width, auto index, std::int64_t total) {
      constexpr int W = decltype(width)::value;
      using Index = typename decltype(index)::type;
      const unsigned grid = grid_for(ceil_div(total, kThreads), kThreads);
      silu_and_mul_bwd_kernel<T, W, Index><<<grid, kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(gate_up), stride,
          reinterpret_cast<T*>(d_gate_up), static_cast<Index>(total),
          static_cast<Index>(inter / W), inter);
      QWEN3_FAST_CHECK_LAUNCH("silu_and_mul_backward");
    });
  });
}

}  // namespace qwen3_fast::cuda
