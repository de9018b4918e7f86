// CPU launchers bound in bindings.cpp. Pointers are raw addresses from torch tensors;
// Python has validated shapes, dtypes and devices, and the launchers re-check sizes.
#pragma once
#include <cstdint>

namespace qwen3_fast::cpu {
using ptr = std::uintptr_t;

// x: [rows, cols] with row stride x_stride; weight: [cols]; y: [rows, cols] contiguous,
// weight dtype; rstd: [rows] float32.
void rms_norm_forward(ptr x, std::int64_t x_stride, ptr weight, ptr y, ptr rstd,
                      std::int64_t rows, std::int64_t cols, double eps, int x_dtype,
                      int w_dtype, int num_threads);
// dy: [rows, cols] contiguous, weight dtype; dx: [rows, cols] contiguous, x dtype;
// dw: [cols] float32 (overwritten); d_residual: optional [rows, cols] x dtype added to dx.
void rms_norm_backward(ptr dy, ptr x, std::int64_t x_stride, ptr weight, ptr rstd,
                       ptr d_residual, ptr dx, ptr dw, std::int64_t rows, std::int64_t cols,
                       int x_dtype, int w_dtype, int num_threads);

// new_residual = x + residual (rounded to x dtype), y = rms_norm(new_residual) * weight.
void add_rms_norm_forward(ptr x, std::int64_t x_stride, ptr residual, std::int64_t r_stride,
                          ptr weight, ptr y, ptr new_residual, ptr rstd, std::int64_t rows,
                          std::int64_t cols, double eps, int x_dtype, int w_dtype,
                          int num_threads);

// gate_up: [rows, 2*inter] with row stride; y: [rows, inter] contiguous.
void silu_and_mul_forward(ptr gate_up, std::int64_t stride, ptr y, std::int64_t rows,
                          std::int64_t inter, int dtype, int num_threads);
// dy: [rows, inter] contiguous; d_gate_up: [rows, 2*inter] contiguous.
void silu_and_mul_backward(ptr dy, ptr gate_up, std::int64_t stride, ptr d_gate_up,
                           std::int64_t rows, std::int64_t inter, int dtype, int num_threads);
}  // namespace qwen3_fast::cpu
