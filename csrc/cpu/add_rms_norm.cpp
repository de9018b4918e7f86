// Fused residual add + RMSNorm on the CPU (the pre-norm step of a decoder layer):
// new_residual = x + residual rounded to the model dtype (as HF adds in that dtype), then
// RMSNorm of it. One read of x and residual, one write of each output. The backward is
// rms_norm_backward with the incoming new_residual gradient added (d_residual).
#include "kernels.h"
#include "rms_norm_row.h"

namespace qwen3_fast::cpu {

void add_rms_norm_forward(ptr x, std::int64_t x_stride, ptr residual, std::int64_t r_stride,
                          ptr weight, ptr y, ptr new_residual, ptr rstd, std::int64_t rows,
                          std::int64_t cols, double eps, int x_dtype, int w_dtype,
                          int num_threads) {
  check_arg(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  check_arg(cols > 0, "cols must be > 0, got " + std::to_string(cols));
  check_arg(rows <= 1 || (x_stride >= cols && r_stride >= cols), "row strides must be >= cols");
  if (rows == 0) return;
  check_ptr(x, "x"); check_ptr(residual, "residual"); check_ptr(weight, "weight");
  check_ptr(y, "y"); check_ptr(new_residual, "new_residual"); check_ptr(rstd, "rstd");
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    const TX* xp = reinterpret_cast<const TX*>(x);
    const TX* rsp = reinterpret_cast<const TX*>(residual);
    const TW* wp = reinterpret_cast<const TW*>(weight);
    TW* yp = reinterpret_cast<TW*>(y);
    TX* np = reinterpret_cast<TX*>(new_residual);
    float* rp = reinterpret_cast<float*>(rstd);
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const TX* xr = xp + r * x_stride;
      const TX* rr = rsp + r * r_stride;
      TX* nr = np + r * cols;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (std::int64_t c = 0; c < cols; ++c) {
        // v is exactly representable in TX, so the second conversion is exact; keeping the
        // value in float (not a TX temporary) lets GCC vectorize the bf16/fp16 loops.
        const float v = round_to<TX>(to_float(xr[c]) + to_float(rr[c]));
        nr[c] = from_float<TX>(v);
        ss += v * v;
      }
      const float rs = qwen3_fast::rms_inv(ss, cols, eps);
      rp[r] = rs;
      normalize_row(nr, wp, yp + r * cols, rs, cols);
    }
  });
}

}  // namespace qwen3_fast::cpu
