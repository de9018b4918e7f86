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
// QuantSpec KV quantization: same layout as the CPU launcher (csrc/cpu/kernels.h).
void kv_quantize(ptr x, ptr u, ptr l, ptr mn, ptr sc, std::int64_t outer, std::int64_t rows,
                 std::int64_t cols, int per_column, int dtype, ptr stream);
// Flash-decoding: as the CPU launcher, plus a float32 workspace from Python: o_part
// [B*Hkv*splits*4, R, D] and lse_part [B*Hkv*splits*4, R] (R = Hq/Hkv * n), with the token
// chunk per block (`chunk`, splits = ceil(max length / chunk)); head_dim 64, 128 or 256.
void flash_decode(ptr q, ptr k_u, ptr k_l, ptr k_min, ptr k_scale, ptr v_u, ptr v_l,
                  ptr v_min, ptr v_scale, ptr k_buf, ptr v_buf, ptr n_quant, ptr lengths,
                  ptr out, ptr o_part, ptr lse_part, std::int64_t batch, std::int64_t heads_q,
                  std::int64_t heads_kv, std::int64_t n_new, std::int64_t head_dim,
                  std::int64_t quant_tokens, std::int64_t ring, std::int64_t group,
                  std::int64_t value_group, std::int64_t chunk, std::int64_t splits,
                  int precision, double scale, int dtype, ptr stream);
// Fused QK-norm + RoPE: arguments as the CPU launchers (csrc/cpu/kernels.h). Out-of-range
// positions give NaN outputs (no table read) instead of an exception.
void qk_norm_rope_forward(ptr q, std::int64_t q_ts, std::int64_t q_hs, ptr k, std::int64_t k_ts,
                          std::int64_t k_hs, ptr q_weight, ptr k_weight, ptr cos, ptr sin,
                          ptr positions, bool pos_int64, ptr q_out, std::int64_t qo_ts,
                          std::int64_t qo_hs, ptr k_out, std::int64_t ko_ts, std::int64_t ko_hs,
                          ptr q_rstd, ptr k_rstd, std::int64_t tokens, std::int64_t hq,
                          std::int64_t hkv, std::int64_t head_dim, std::int64_t max_pos,
                          double eps, int x_dtype, int w_dtype, ptr stream);
// dq_weight_partial / dk_weight_partial: [partial_rows, head_dim] float32, fully written.
void qk_norm_rope_backward(ptr dq_out, ptr dk_out, ptr q, std::int64_t q_ts, std::int64_t q_hs,
                           ptr k, std::int64_t k_ts, std::int64_t k_hs, ptr q_weight,
                           ptr k_weight, ptr cos, ptr sin, ptr positions, bool pos_int64,
                           ptr q_rstd, ptr k_rstd, ptr dq, ptr dk, ptr dq_weight_partial,
                           ptr dk_weight_partial, std::int64_t partial_rows, std::int64_t tokens,
                           std::int64_t hq, std::int64_t hkv, std::int64_t head_dim,
                           std::int64_t max_pos, int x_dtype, int w_dtype, ptr stream);
// MoE permutation (moe_permute.cu): as csrc/cpu/kernels.h (the same stable order), plus
// workspace: >= ceil(slots / 1024) * num_experts int64 scratch; num_experts <= 4096.
void moe_sort(ptr expert_ids, ptr offsets, ptr row_map, ptr workspace,
              std::int64_t workspace_elems, std::int64_t slots, std::int64_t num_experts,
              ptr stream);
void moe_permute(ptr src, std::int64_t src_stride, ptr row_map, ptr scale, ptr dst,
                 std::int64_t tokens, std::int64_t top_k, std::int64_t rows, std::int64_t cols,
                 int dtype, ptr stream);
void moe_unpermute(ptr src, ptr row_map, ptr weights, ptr dst, std::int64_t tokens,
                   std::int64_t top_k, std::int64_t rows, std::int64_t cols, int dtype,
                   ptr stream);
void moe_unpermute_backward(ptr dy, ptr src, ptr row_map, ptr weights, ptr d_src,
                            ptr d_weights, std::int64_t tokens, std::int64_t top_k,
                            std::int64_t rows, std::int64_t cols, int dtype, ptr stream);
// Grouped GEMM (grouped_gemm.cu). a [m, k], b [groups, k, n] ([groups, n, k] if trans_b),
// offsets [groups+1] int64 on the device, c [m, n]; all contiguous.
void grouped_gemm(ptr a, ptr b, ptr offsets, ptr c, std::int64_t m, std::int64_t n,
                  std::int64_t k, std::int64_t groups, bool trans_b, int dtype, ptr stream);
// out [groups, p, q] = per group x_g^T y_g; x [m, p], y [m, q].
void grouped_gemm_wgrad(ptr x, ptr y, ptr offsets, ptr out, std::int64_t m, std::int64_t p,
                        std::int64_t q, std::int64_t groups, int dtype, ptr stream);
// CUTLASS 3.x sm_90a ptr-array grouped GEMM (grouped_gemm_sm90.cu): same arguments as the
// two launchers above plus a device workspace (16-byte aligned, at least
// grouped_gemm_sm90_workspace_size(groups) bytes, for the per-group arrays built on the
// device and CUTLASS's TMA descriptors). float16/bfloat16; n, k (p, q) multiples of 8.
// available(): this build has the kernel (CUTLASS headers, 90a in the arch list); the
// launchers also need a compute capability 9.0 device (std::runtime_error otherwise).
bool grouped_gemm_sm90_available();
std::int64_t grouped_gemm_sm90_workspace_size(std::int64_t groups);
void grouped_gemm_sm90(ptr a, ptr b, ptr offsets, ptr c, ptr workspace,
                       std::int64_t workspace_size, std::int64_t m, std::int64_t n,
                       std::int64_t k, std::int64_t groups, bool trans_b, int dtype, ptr stream);
void grouped_gemm_sm90_wgrad(ptr x, ptr y, ptr offsets, ptr out, ptr workspace,
                             std::int64_t workspace_size, std::int64_t m, std::int64_t p,
                             std::int64_t q, std::int64_t groups, int dtype, ptr stream);
}  // namespace qwen3_fast::cuda
