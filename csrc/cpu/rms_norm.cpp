// RMSNorm on the CPU: one pass per row for the sum of squares, one to write (the row is in
// L1/L2 by then), rows split across OpenMP threads. Backward reduces dweight in per-thread
// float32 partials so no two threads write one address.
#include <vector>

#include "kernels.h"
#include "rms_norm_row.h"

namespace qwen3_fast::cpu {

namespace {
void check_sizes(std::int64_t rows, std::int64_t cols, std::int64_t x_stride) {
  check_arg(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  check_arg(cols > 0, "cols must be > 0, got " + std::to_string(cols));
  check_arg(rows <= 1 || x_stride >= cols,
            "x row stride " + std::to_string(x_stride) + " is smaller than cols " + std::to_string(cols));
}
}  // namespace

void rms_norm_forward(ptr x, std::int64_t x_stride, ptr weight, ptr y, ptr rstd,
                      std::int64_t rows, std::int64_t cols, double eps, int x_dtype,
                      int w_dtype, int num_threads) {
  check_sizes(rows, cols, x_stride);
  if (rows == 0) return;
  check_ptr(x, "x"); check_ptr(weight, "weight"); check_ptr(y, "y"); check_ptr(rstd, "rstd");
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    const TX* xp = reinterpret_cast<const TX*>(x);
    const TW* wp = reinterpret_cast<const TW*>(weight);
    TW* yp = reinterpret_cast<TW*>(y);
    float* rp = reinterpret_cast<float*>(rstd);
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const TX* xr = xp + r * x_stride;
      const float rs = qwen3_fast::rms_inv(sum_squares(xr, cols), cols, eps);
      rp[r] = rs;
      normalize_row(xr, wp, yp + r * cols, rs, cols);
    }
  });
}

void rms_norm_backward(ptr dy, ptr x, std::int64_t x_stride, ptr weight, ptr rstd,
                       ptr d_residual, ptr dx, ptr dw, std::int64_t rows, std::int64_t cols,
                       int x_dtype, int w_dtype, int num_threads) {
  check_sizes(rows, cols, x_stride);
  check_ptr(dw, "dw");
  float* dwp = reinterpret_cast<float*>(dw);
  for (std::int64_t c = 0; c < cols; ++c) dwp[c] = 0.0f;
  if (rows == 0) return;
  check_ptr(dy, "dy"); check_ptr(x, "x"); check_ptr(weight, "weight"); check_ptr(rstd, "rstd");
  check_ptr(dx, "dx");
  const int nt = static_cast<int>(std::min<std::int64_t>(clamp_threads(num_threads), rows));
  std::vector<float> partial(static_cast<std::size_t>(nt) * cols, 0.0f);
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    const TW* dyp = reinterpret_cast<const TW*>(dy);
    const TX* xp = reinterpret_cast<const TX*>(x);
    const TW* wp = reinterpret_cast<const TW*>(weight);
    const float* rp = reinterpret_cast<const float*>(rstd);
    const TX* drp = reinterpret_cast<const TX*>(d_residual);  // may be null
    TX* dxp = reinterpret_cast<TX*>(dx);
#pragma omp parallel num_threads(nt)
    {
      float* acc = partial.data() + static_cast<std::size_t>(omp_get_thread_num()) * cols;
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < rows; ++r) {
        const TX* xr = xp + r * x_stride;
        const TW* dyr = dyp + r * cols;
        const float rs = rp[r];
        // n = x * rstd, dn = dy * w; dx = rstd * (dn - n * mean(dn * n))
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (std::int64_t c = 0; c < cols; ++c) {
          const float n = to_float(xr[c]) * rs;
          const float g = to_float(dyr[c]);
          dot += g * to_float(wp[c]) * n;
          acc[c] += g * round_to<TX>(n);
        }
        const float mean_dot = dot / static_cast<float>(cols);
        TX* dxr = dxp + r * cols;
        if (drp != nullptr) {
          const TX* drr = drp + r * cols;
#pragma omp simd
          for (std::int64_t c = 0; c < cols; ++c) {
            const float n = to_float(xr[c]) * rs;
            const float dn = to_float(dyr[c]) * to_float(wp[c]);
            dxr[c] = from_float<TX>(qwen3_fast::rms_norm_dx(rs, dn, n, mean_dot) + to_float(drr[c]));
          }
        } else {
#pragma omp simd
          for (std::int64_t c = 0; c < cols; ++c) {
            const float n = to_float(xr[c]) * rs;
            const float dn = to_float(dyr[c]) * to_float(wp[c]);
            dxr[c] = from_float<TX>(qwen3_fast::rms_norm_dx(rs, dn, n, mean_dot));
          }
        }
      }
    }
  });
  for (int t = 0; t < nt; ++t) {
    const float* acc = partial.data() + static_cast<std::size_t>(t) * cols;
#pragma omp simd
    for (std::int64_t c = 0; c < cols; ++c) dwp[c] += acc[c];
  }
}

}  // namespace qwen3_fast::cpu
