// CUDA launchers bound in bindings.cpp (only when built with QWEN3_FAST_WITH_CUDA).
// Same arguments as the CPU launchers in csrc/cpu/kernels.h, plus the CUDA stream
// (torch's current stream, passed as an integer handle). Launchers check sizes and throw
// std::invalid_argument (ValueError in Python); a failed launch throws std::runtime_error
// with the CUDA error string. All pointers are device pointers on the current device.
#pragma once
#include <cstdint>

namespace qwen3_fast::cuda {
using ptr = std::uintptr_t;

void rms_norm_forward(ptr x, std::int64_t x_stride, ptr weight, ptr y, ptr rstd,
                      std::int64_t rows, std::int64_t cols, double eps, int x_dtype,
                      int w_dtype, ptr stream);
// dw_partial: [partial_rows, cols] float32, fully overwritten; Python sums it over dim 0.
// Rows are split over partial_rows thread blocks (grid-stride), one partial row each.
void rms_norm_backward(ptr dy, ptr x, std::int64_t x_stride, ptr weight, ptr rstd,
                       ptr d_residual, ptr dx, ptr dw_partial, std::int64_t partial_rows,
                       std::int64_t rows, std::int64_t cols, int x_dtype, int w_dtype,
                       ptr stream);
void add_rms_norm_forward(ptr x, std::int64_t x_stride, ptr residual, std::int64_t r_stride,
                          ptr weight, ptr y, ptr new_residual, ptr rstd, std::int64_t rows,
                          std::int64_t cols, double eps, int x_dtype, int w_dtype, ptr stream);
void silu_and_mul_forward(ptr gate_up, std::int64_t stride, ptr y, std::int64_t rows,
                          std::int64_t inter, int dtype, ptr stream);
void silu_and_mul_backward(ptr dy, ptr gate_up, std::int64_t stride, ptr d_gate_up,
                           std::int64_t rows, std::int64_t inter, int dtype, ptr stream);
}  // namespace qwen3_fast::cuda
