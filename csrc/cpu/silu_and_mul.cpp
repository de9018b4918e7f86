// SwiGLU activation on the CPU: y = silu(gate) * up with gate_up = [gate | up] per row.
// Rounds like HF's `act_fn(gate) * up` in the model dtype: silu rounded, then the product.
// The backward recomputes silu from gate_up instead of saving it.
#include "cpu_math.h"
#include "kernels.h"
#include "qwen3_fast/norm_act_math.h"

namespace qwen3_fast::cpu {

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
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* g = gp + r * stride;
      const T* u = g + inter;
      T* yr = yp + r * inter;
#pragma omp simd
      for (std::int64_t c = 0; c < inter; ++c) {
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
