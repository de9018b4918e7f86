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

// Fused QK-norm + RoPE (qk_norm_rope.cpp). q: [tokens, hq, head_dim] with token/head strides
// (elements, unit column stride), k likewise with hkv heads; weights [head_dim] (x dtype or
// float32 = output dtype); cos/sin: [max_pos, head_dim] float32 contiguous; positions:
// [tokens] int32 or int64 (pos_int64), each in [0, max_pos) or std::invalid_argument before
// any write. Outputs with their own strides (may alias q / k: in place); q_rstd [tokens, hq]
// and k_rstd [tokens, hkv] float32, or null to skip.
void qk_norm_rope_forward(ptr q, std::int64_t q_ts, std::int64_t q_hs, ptr k, std::int64_t k_ts,
                          std::int64_t k_hs, ptr q_weight, ptr k_weight, ptr cos, ptr sin,
                          ptr positions, bool pos_int64, ptr q_out, std::int64_t qo_ts,
                          std::int64_t qo_hs, ptr k_out, std::int64_t ko_ts, std::int64_t ko_hs,
                          ptr q_rstd, ptr k_rstd, std::int64_t tokens, std::int64_t hq,
                          std::int64_t hkv, std::int64_t head_dim, std::int64_t max_pos,
                          double eps, int x_dtype, int w_dtype, int num_threads);
// dq_out/dk_out: contiguous, weight dtype; dq/dk: contiguous, x dtype; dq_weight/dk_weight:
// [head_dim] float32 (overwritten).
void qk_norm_rope_backward(ptr dq_out, ptr dk_out, ptr q, std::int64_t q_ts, std::int64_t q_hs,
                           ptr k, std::int64_t k_ts, std::int64_t k_hs, ptr q_weight,
                           ptr k_weight, ptr cos, ptr sin, ptr positions, bool pos_int64,
                           ptr q_rstd, ptr k_rstd, ptr dq, ptr dk, ptr dq_weight, ptr dk_weight,
                           std::int64_t tokens, std::int64_t hq, std::int64_t hkv,
                           std::int64_t head_dim, std::int64_t max_pos, int x_dtype, int w_dtype,
                           int num_threads);
// QuantSpec KV quantization (csrc/include/qwen3_fast/kv_quant_math.h). x: [outer, rows,
// cols] contiguous; per_column: groups are the columns of each [rows, cols] tile (keys),
// min/scale [outer, cols]; else groups are rows (values), min/scale [outer, rows].
// u, l: nibble-packed upper/lower halves of the 8-bit code, uint8: per_column (keys)
// [outer, cols, rows/2] (channel-major, token pairs per byte; rows even), else
// [outer, rows, cols/2].
void kv_quantize(ptr x, ptr u, ptr l, ptr mn, ptr sc, std::int64_t outer, std::int64_t rows,
                 std::int64_t cols, int per_column, int dtype, int num_threads);
// Its inverse: the same u, l, mn, sc (l unused for bits 4) -> out [outer, rows, cols] float32.
void kv_dequantize(ptr u, ptr l, ptr mn, ptr sc, ptr out, std::int64_t outer,
                   std::int64_t rows, std::int64_t cols, int per_column, int bits, int dtype,
                   int num_threads);
// Flash-decoding over a hierarchical cache layer (precision 8/4) or a dense one (16: k_buf/
// v_buf are [B, Hkv, ring = T, D], quantized pointers unused). q, out: [B, Hq, n, D];
// k_u, k_l: [B, Hkv, quant_tokens/G, D, G/2] uint8 (channel-major per group, token pairs
// per byte); v_u, v_l: [B, Hkv, quant_tokens, D/2]; k_min/k_scale [B, Hkv, quant_tokens/G, D];
// v_min/v_scale [B, Hkv, quant_tokens, D/value_group]; k_buf/v_buf [B, Hkv, ring, D];
// n_quant, lengths: [B] int32 (lengths include the n new tokens).
void flash_decode(ptr q, ptr k_u, ptr k_l, ptr k_min, ptr k_scale, ptr v_u, ptr v_l,
                  ptr v_min, ptr v_scale, ptr k_buf, ptr v_buf, ptr n_quant, ptr lengths,
                  ptr out, std::int64_t batch, std::int64_t heads_q, std::int64_t heads_kv,
                  std::int64_t n_new, std::int64_t head_dim, std::int64_t quant_tokens,
                  std::int64_t ring, std::int64_t group, std::int64_t value_group,
                  int precision, double scale, int dtype, int num_threads);
// MoE permutation (moe_permute.cpp). A slot s = t * top_k + k; expert_ids: [slots] int64;
// offsets: [E+1] int64 (written); row_map: [slots] int64, slot -> expert-sorted row (written).
void moe_sort(ptr expert_ids, ptr offsets, ptr row_map, std::int64_t slots,
              std::int64_t num_experts, int num_threads);
// dst[row_map[t*top_k+k]] = src[t] (* scale[s] rounded to the dtype when scale is not null).
// src: [tokens, cols] with row stride; scale: [rows] float32 or null; dst: [rows, cols].
void moe_permute(ptr src, std::int64_t src_stride, ptr row_map, ptr scale, ptr dst,
                 std::int64_t tokens, std::int64_t top_k, std::int64_t rows, std::int64_t cols,
                 int dtype, int num_threads);
// dst[t] = sum_k src[row_map[s]] * weights[s] (weights [tokens*top_k] float32, null = 1).
void moe_unpermute(ptr src, ptr row_map, ptr weights, ptr dst, std::int64_t tokens,
                   std::int64_t top_k, std::int64_t rows, std::int64_t cols, int dtype,
                   int num_threads);
// d_src[row_map[s]] = dy[t] * weights[s]; d_weights[s] = <dy[t], src[row_map[s]]> (float32).
void moe_unpermute_backward(ptr dy, ptr src, ptr row_map, ptr weights, ptr d_src,
                            ptr d_weights, std::int64_t tokens, std::int64_t top_k,
                            std::int64_t rows, std::int64_t cols, int dtype, int num_threads);
// Grouped GEMM, bfloat16 "NT" (grouped_gemm.cpp): c[rows of g] = a[rows of g] @ b[g]^T;
// a [m, k], b [groups, n, k], c [m, n] row-major; offsets [groups+1] int64 (host memory).
// Rows outside every group are not written. Needs AVX512-BF16 (see ..._available()).
bool grouped_gemm_nt_bf16_available();
void grouped_gemm_nt_bf16(ptr a, ptr b, ptr offsets, ptr c, std::int64_t m, std::int64_t n,
                          std::int64_t k, std::int64_t groups, int num_threads);
// NN form: c[rows of g] = a[rows of g] @ b[g], b [groups, k, n].
void grouped_gemm_nn_bf16(ptr a, ptr b, ptr offsets, ptr c, std::int64_t m, std::int64_t n,
                          std::int64_t k, std::int64_t groups, int num_threads);
// Weight gradient of a grouped GEMM for groups of 1..4 rows (MoE experts with a token or
// a few): out[g] = p[rows of g]^T @ q[rows of g], p [m, np], q [m, nq], out [groups, np, nq]
// row-major bf16; float32 sums in row order, rounded once. Groups with 0 or > 4 rows are
// not written (the caller zeroes / computes them).
void grouped_wgrad_small_bf16(ptr p, ptr q, ptr offsets, ptr out, std::int64_t m,
                              std::int64_t np, std::int64_t nq, std::int64_t groups,
                              int num_threads);
// Skinny bfloat16 linear (linear.cpp): y[m, n] = x[m, k] @ w[n, k]^T, 1 <= m <= 16, all
// contiguous row-major bf16; AVX512-BF16 when built with it, else a portable float loop.
void linear_bf16(ptr x, ptr w, ptr y, std::int64_t m, std::int64_t n, std::int64_t k,
                 int num_threads);
// One decode step through all decoder layers of a dense bf16 Qwen3 model over a bf16 cache
// (decode_layers.cpp), n_new tokens per sequence (positions lengths[b] - n_new ..
// lengths[b] - 1): x [batch * n_new, hidden] embeddings of the new tokens; weights: int64
// [layers, 11] pointers (input_layernorm, q, k, v, q_norm, k_norm, o, post_attention_layernorm,
// gate, up, down; projections [out, in] contiguous); cache: int64 [layers, 10] pointers per
// layer (k_buf, v_buf [batch, heads_kv, ring, head_dim] bf16, then k_u, k_l, k_min, k_scale,
// v_u, v_l, v_min, v_scale as flash_decode takes them, 0 for a dense cache: precision 16,
// ring = capacity); a new token's key/value go to slot position % ring (no group is
// quantized: the caller checks); n_quant, lengths [batch] int32 including the new tokens;
// cos/sin [max_pos, head_dim] float32; out [batch * n_new, hidden] = the final norm's output.
// Kernel thread counts: `threads` for calls streaming >= uncapped_stream_bytes, else
// small_threads (ops/_kernel_args.launch's rule). 1 <= batch * n_new <= 16.
void decode_layers_bf16(ptr x, ptr weights, ptr cache, ptr n_quant, ptr lengths, ptr cos,
                        ptr sin, ptr final_norm, ptr out, std::int64_t batch, std::int64_t n_new,
                        std::int64_t layers, std::int64_t hidden, std::int64_t heads_q,
                        std::int64_t heads_kv, std::int64_t head_dim, std::int64_t inter,
                        std::int64_t ring, std::int64_t quant_tokens, std::int64_t group,
                        std::int64_t value_group, int precision, std::int64_t max_pos,
                        double eps, double scale, int threads, int small_threads,
                        std::int64_t uncapped_stream_bytes);
}  // namespace qwen3_fast::cpu
