// Fused QK-norm + RoPE on CUDA, HF rounding (same math as csrc/cpu/qk_norm_rope.cpp).
//
// Rows are (token, head) pairs over q's Hq heads then k's Hkv heads. A group of tpr
// threads (a power of two <= 32, shuffle-only reductions, several rows per block) owns a
// row; each thread holds the same V-element chunk of both halves of the row, so the
// half-split rotation pairs x[i] with x[i + D/2] inside one thread (no shuffles). 16-byte
// loads/stores when pointers, strides and D/2 allow; scalar otherwise. The second pass
// re-reads x (an L1 hit), which also makes the in-place call safe: a thread writes only
// the chunks it read. Products use __fmul_rn/__fadd_rn so that float32 outputs round
// like torch's separate elementwise ops (no FMA contraction).
//
// Out-of-range positions: no table read, NaN outputs (a kernel cannot raise without a sync).
// Backward: partial_rows blocks of 128 threads; each row group sums its dweight
// contributions in its own [2, D] float32 row of shared memory (only its own columns, no
// atomics); the block adds its groups' rows in a fixed order into one partial row of
// dq_weight and of dk_weight. Python sums the partials.
#include <cmath>
#include <initializer_list>

#include "cuda/cuda_utils.cuh"
#include "cuda/kernels.h"

namespace qwen3_fast::cuda {

namespace {

constexpr int kFwdBlock = 256;
constexpr int kBwdBlock = 128;
constexpr int kBwdSmemBytes = 48 * 1024;

struct QkArgs {
  const void* q; std::int64_t q_ts, q_hs;
  const void* k; std::int64_t k_ts, k_hs;
  const void* qw; const void* kw;
  const float* cos; const float* sin;
  const void* positions; bool pos_int64;
  std::int64_t tokens; int hq, hkv, d; std::int64_t max_pos;
};

__device__ __forceinline__ std::int64_t load_position(const void* p, bool int64, std::int64_t t) {
  return int64 ? static_cast<const std::int64_t*>(p)[t]
               : static_cast<std::int64_t>(static_cast<const std::int32_t*>(p)[t]);
}

template <int V>
__device__ __forceinline__ Pack<float, V> load_table(const float* table, bool valid) {
  if (valid) return load_pack<float, V>(table);
  Pack<float, V> z;
#pragma unroll
  for (int e = 0; e < V; ++e) z.v[e] = 0.0f;
  return z;
}

// Threads per row: enough for one chunk each, a power of two <= 32.
inline int threads_per_row(int chunks) {
  int tpr = 1;
  while (tpr < chunks && tpr < 32) tpr <<= 1;
  return tpr;
}

template <typename TX, typename TW, int V>
__global__ void __launch_bounds__(kFwdBlock)
qk_norm_rope_fwd_kernel(QkArgs a, TW* q_out, std::int64_t qo_ts, std::int64_t qo_hs, TW* k_out,
                        std::int64_t ko_ts, std::int64_t ko_hs, float* q_rstd, float* k_rstd,
                        int tpr, int rpb, float eps) {
  const int h = a.d / 2;
  const int nchunk = h / V;
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const int heads = a.hq + a.hkv;
  const std::int64_t rows = a.tokens * heads;
  for (std::int64_t r0 = static_cast<std::int64_t>(blockIdx.x) * rpb; r0 < rows;
       r0 += static_cast<std::int64_t>(gridDim.x) * rpb) {
    const std::int64_t row = r0 + group;
    const bool active = row < rows;
    const std::int64_t t = active ? row / heads : 0;
    const int hh = active ? static_cast<int>(row % heads) : 0;
    const bool is_q = hh < a.hq;
    const TX* x = is_q ? static_cast<const TX*>(a.q) + t * a.q_ts + hh * a.q_hs
                       : static_cast<const TX*>(a.k) + t * a.k_ts + (hh - a.hq) * a.k_hs;
    float ss = 0.0f;
    if (active) {
      for (int j = lane; j < nchunk; j += tpr) {
        ss += sum_squares(load_pack<TX, V>(x + j * V)) + sum_squares(load_pack<TX, V>(x + h + j * V));
      }
    }
    ss = warp_sum(ss, tpr);
    if (!active) continue;
    const float rs = rms_inv(ss, a.d, static_cast<double>(eps));
    if (lane == 0) {
      float* rp = is_q ? q_rstd : k_rstd;
      if (rp != nullptr) rp[is_q ? t * a.hq + hh : t * a.hkv + (hh - a.hq)] = rs;
    }
    const std::int64_t pos = load_position(a.positions, a.pos_int64, t);
    const bool valid = pos >= 0 && pos < a.max_pos;
    const float* cr = a.cos + (valid ? pos : 0) * a.d;
    const float* sr = a.sin + (valid ? pos : 0) * a.d;
    const TW* w = static_cast<const TW*>(is_q ? a.qw : a.kw);
    TW* out = is_q ? q_out + t * qo_ts + hh * qo_hs : k_out + t * ko_ts + (hh - a.hq) * ko_hs;
    const float nan = __int_as_float(0x7fc00000);
    for (int j = lane; j < nchunk; j += tpr) {
      const int i0 = j * V;
      const Pack<TX, V> xa = load_pack<TX, V>(x + i0), xb = load_pack<TX, V>(x + h + i0);
      const Pack<TW, V> wa = load_pack<TW, V>(w + i0), wb = load_pack<TW, V>(w + h + i0);
      const Pack<float, V> ca = load_table<V>(cr + i0, valid), cb = load_table<V>(cr + h + i0, valid);
      const Pack<float, V> sa = load_table<V>(sr + i0, valid), sb = load_table<V>(sr + h + i0, valid);
      Pack<TW, V> oa, ob;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float ya = round_to<TW>(__fmul_rn(to_float(wa.v[e]), round_to<TX>(to_float(xa.v[e]) * rs)));
        const float yb = round_to<TW>(__fmul_rn(to_float(wb.v[e]), round_to<TX>(to_float(xb.v[e]) * rs)));
        const float c0 = round_to<TW>(ca.v[e]), c1 = round_to<TW>(cb.v[e]);
        const float s0 = round_to<TW>(sa.v[e]), s1 = round_to<TW>(sb.v[e]);
        const float o0 = __fsub_rn(round_to<TW>(__fmul_rn(ya, c0)), round_to<TW>(__fmul_rn(yb, s0)));
        const float o1 = __fadd_rn(round_to<TW>(__fmul_rn(yb, c1)), round_to<TW>(__fmul_rn(ya, s1)));
        oa.v[e] = from_float<TW>(valid ? o0 : nan);
        ob.v[e] = from_float<TW>(valid ? o1 : nan);
      }
      store_pack<TW, V>(out + i0, oa);
      store_pack<TW, V>(out + h + i0, ob);
    }
  }
}

// dy of one chunk: the transposed rotation of dout, rounded to TW like torch's autograd of
// `y * c + rotate_half(y) * s` (products rounded, then the sum).
template <typename TW, int V>
__device__ __forceinline__ void rope_dy(const Pack<TW, V>& ga, const Pack<TW, V>& gb,
                                        const Pack<float, V>& ca, const Pack<float, V>& cb,
                                        const Pack<float, V>& sa, const Pack<float, V>& sb,
                                        float* dya, float* dyb) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float g0 = to_float(ga.v[e]), g1 = to_float(gb.v[e]);
    const float c0 = round_to<TW>(ca.v[e]), c1 = round_to<TW>(cb.v[e]);
    const float s0 = round_to<TW>(sa.v[e]), s1 = round_to<TW>(sb.v[e]);
    dya[e] = round_to<TW>(__fadd_rn(round_to<TW>(__fmul_rn(g0, c0)), round_to<TW>(__fmul_rn(g1, s1))));
    dyb[e] = round_to<TW>(__fsub_rn(round_to<TW>(__fmul_rn(g1, c1)), round_to<TW>(__fmul_rn(g0, s0))));
  }
}

template <typename TX, typename TW, int V>
__global__ void __launch_bounds__(kBwdBlock)
qk_norm_rope_bwd_kernel(QkArgs a, const TW* dq_out, const TW* dk_out, const float* q_rstd,
                        const float* k_rstd, TX* dq, TX* dk, float* dqw_partial,
                        float* dkw_partial, int tpr, int rpb) {
  extern __shared__ float4 dyn_smem[];
  float* acc_all = reinterpret_cast<float*>(dyn_smem);  // [rpb, 2, d]
  const int d = a.d;
  const int h = d / 2;
  const int nchunk = h / V;
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  const int group = static_cast<int>(threadIdx.x) / tpr;
  const int heads = a.hq + a.hkv;
  const std::int64_t rows = a.tokens * heads;
  for (int c = threadIdx.x; c < rpb * 2 * d; c += blockDim.x) acc_all[c] = 0.0f;
  __syncthreads();
  for (std::int64_t r0 = static_cast<std::int64_t>(blockIdx.x) * rpb; r0 < rows;
       r0 += static_cast<std::int64_t>(gridDim.x) * rpb) {
    const std::int64_t row = r0 + group;
    const bool active = row < rows;
    const std::int64_t t = active ? row / heads : 0;
    const int hh = active ? static_cast<int>(row % heads) : 0;
    const bool is_q = hh < a.hq;
    const std::int64_t orow = is_q ? t * a.hq + hh : t * a.hkv + (hh - a.hq);  // [N, H] index
    const TX* x = is_q ? static_cast<const TX*>(a.q) + t * a.q_ts + hh * a.q_hs
                       : static_cast<const TX*>(a.k) + t * a.k_ts + (hh - a.hq) * a.k_hs;
    const TW* g = (is_q ? dq_out : dk_out) + orow * d;
    const TW* w = static_cast<const TW*>(is_q ? a.qw : a.kw);
    float* acc = acc_all + (group * 2 + (is_q ? 0 : 1)) * d;
    const std::int64_t pos = active ? load_position(a.positions, a.pos_int64, t) : 0;
    const bool valid = pos >= 0 && pos < a.max_pos;
    const float* cr = a.cos + (valid ? pos : 0) * d;
    const float* sr = a.sin + (valid ? pos : 0) * d;
    const float rs = active ? (is_q ? q_rstd : k_rstd)[orow] : 0.0f;
    float dot = 0.0f;
    if (active) {
      for (int j = lane; j < nchunk; j += tpr) {
        const int i0 = j * V;
        float dya[V], dyb[V];
        rope_dy<TW, V>(load_pack<TW, V>(g + i0), load_pack<TW, V>(g + h + i0),
                       load_table<V>(cr + i0, valid), load_table<V>(cr + h + i0, valid),
                       load_table<V>(sr + i0, valid), load_table<V>(sr + h + i0, valid), dya, dyb);
        const Pack<TX, V> xa = load_pack<TX, V>(x + i0), xb = load_pack<TX, V>(x + h + i0);
        const Pack<TW, V> wa = load_pack<TW, V>(w + i0), wb = load_pack<TW, V>(w + h + i0);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float na = to_float(xa.v[e]) * rs, nb = to_float(xb.v[e]) * rs;
          dot += dya[e] * to_float(wa.v[e]) * na + dyb[e] * to_float(wb.v[e]) * nb;
          acc[i0 + e] += dya[e] * round_to<TX>(na);
          acc[h + i0 + e] += dyb[e] * round_to<TX>(nb);
        }
      }
    }
    dot = warp_sum(dot, tpr);
    if (!active) continue;
    const float mean_dot = dot / static_cast<float>(d);
    TX* dx = (is_q ? dq : dk) + orow * d;
    for (int j = lane; j < nchunk; j += tpr) {
      const int i0 = j * V;
      float dya[V], dyb[V];
      rope_dy<TW, V>(load_pack<TW, V>(g + i0), load_pack<TW, V>(g + h + i0),
                     load_table<V>(cr + i0, valid), load_table<V>(cr + h + i0, valid),
                     load_table<V>(sr + i0, valid), load_table<V>(sr + h + i0, valid), dya, dyb);
      const Pack<TX, V> xa = load_pack<TX, V>(x + i0), xb = load_pack<TX, V>(x + h + i0);
      const Pack<TW, V> wa = load_pack<TW, V>(w + i0), wb = load_pack<TW, V>(w + h + i0);
      Pack<TX, V> oa, ob;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float na = to_float(xa.v[e]) * rs, nb = to_float(xb.v[e]) * rs;
        oa.v[e] = from_float<TX>(rms_norm_dx(rs, dya[e] * to_float(wa.v[e]), na, mean_dot));
        ob.v[e] = from_float<TX>(rms_norm_dx(rs, dyb[e] * to_float(wb.v[e]), nb, mean_dot));
      }
      store_pack<TX, V>(dx + i0, oa);
      store_pack<TX, V>(dx + h + i0, ob);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < 2 * d; c += blockDim.x) {
    float s = 0.0f;
    for (int gi = 0; gi < rpb; ++gi) s += acc_all[gi * 2 * d + c];
    if (c < d) {
      dqw_partial[static_cast<std::int64_t>(blockIdx.x) * d + c] = s;
    } else {
      dkw_partial[static_cast<std::int64_t>(blockIdx.x) * d + (c - d)] = s;
    }
  }
}

void check_qk_sizes(std::int64_t tokens, std::int64_t hq, std::int64_t hkv, std::int64_t head_dim,
                    std::int64_t max_pos) {
  check_arg(tokens >= 0, "tokens must be >= 0, got " + std::to_string(tokens));
  check_arg(hq > 0 && hkv > 0 && hq + hkv <= INT32_MAX,
            "hq and hkv must be > 0, got " + std::to_string(hq) + ", " + std::to_string(hkv));
  check_arg(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 65536,
            "head_dim must be even, in (0, 65536], got " + std::to_string(head_dim));
  check_arg(max_pos > 0, "max_pos (rows of cos/sin) must be > 0, got " + std::to_string(max_pos));
}

// 16-byte chunks when every pointer and stride allows them.
template <typename TX>
bool use_vec(std::int64_t head_dim, std::initializer_list<std::uintptr_t> ptrs,
             std::initializer_list<std::int64_t> strides) {
  constexpr int V = 16 / sizeof(TX);
  if ((head_dim / 2) % V != 0) return false;
  for (auto p : ptrs) if (p != 0 && !aligned16(p)) return false;
  for (auto s : strides) if (s % V != 0) return false;
  return true;
}

QkArgs make_args(ptr q, std::int64_t q_ts, std::int64_t q_hs, ptr k, std::int64_t k_ts,
                 std::int64_t k_hs, ptr q_weight, ptr k_weight, ptr cos, ptr sin, ptr positions,
                 bool pos_int64, std::int64_t tokens, std::int64_t hq, std::int64_t hkv,
                 std::int64_t head_dim, std::int64_t max_pos) {
  return QkArgs{reinterpret_cast<const void*>(q), q_ts, q_hs, reinterpret_cast<const void*>(k),
                k_ts, k_hs, reinterpret_cast<const void*>(q_weight),
                reinterpret_cast<const void*>(k_weight), reinterpret_cast<const float*>(cos),
                reinterpret_cast<const float*>(sin), reinterpret_cast<const void*>(positions),
                pos_int64, tokens, static_cast<int>(hq), static_cast<int>(hkv),
                static_cast<int>(head_dim), max_pos};
}

}  // namespace

void qk_norm_rope_forward(ptr q, std::int64_t q_ts, std::int64_t q_hs, ptr k, std::int64_t k_ts,
                          std::int64_t k_hs, ptr q_weight, ptr k_weight, ptr cos, ptr sin,
                          ptr positions, bool pos_int64, ptr q_out, std::int64_t qo_ts,
                          std::int64_t qo_hs, ptr k_out, std::int64_t ko_ts, std::int64_t ko_hs,
                          ptr q_rstd, ptr k_rstd, std::int64_t tokens, std::int64_t hq,
                          std::int64_t hkv, std::int64_t head_dim, std::int64_t max_pos,
                          double eps, int x_dtype, int w_dtype, ptr stream) {
  check_qk_sizes(tokens, hq, hkv, head_dim, max_pos);
  if (tokens == 0) return;
  check_ptr(q, "q"); check_ptr(k, "k"); check_ptr(q_weight, "q_weight");
  check_ptr(k_weight, "k_weight"); check_ptr(cos, "cos"); check_ptr(sin, "sin");
  check_ptr(positions, "positions"); check_ptr(q_out, "q_out"); check_ptr(k_out, "k_out");
  const QkArgs a = make_args(q, q_ts, q_hs, k, k_ts, k_hs, q_weight, k_weight, cos, sin,
                             positions, pos_int64, tokens, hq, hkv, head_dim, max_pos);
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    constexpr int V = 16 / sizeof(TX);
    const bool vec = use_vec<TX>(head_dim, {q, k, q_weight, k_weight, cos, sin, q_out, k_out},
                                 {q_ts, q_hs, k_ts, k_hs, qo_ts, qo_hs, ko_ts, ko_hs, head_dim});
    const auto launch = [&](auto kernel, int v) {
      const int tpr = threads_per_row(static_cast<int>(head_dim / 2 / v));
      const int rpb = kFwdBlock / tpr;
      const unsigned grid = grid_for(ceil_div(tokens * (hq + hkv), rpb), tpr * rpb);
      kernel<<<grid, tpr * rpb, 0, as_stream(stream)>>>(
          a, reinterpret_cast<TW*>(q_out), qo_ts, qo_hs, reinterpret_cast<TW*>(k_out), ko_ts,
          ko_hs, reinterpret_cast<float*>(q_rstd), reinterpret_cast<float*>(k_rstd), tpr, rpb,
          static_cast<float>(eps));
      QWEN3_FAST_CHECK_LAUNCH("qk_norm_rope_forward");
    };
    if (vec) {
      launch(qk_norm_rope_fwd_kernel<TX, TW, V>, V);
    } else {
      launch(qk_norm_rope_fwd_kernel<TX, TW, 1>, 1);
    }
  });
}

void qk_norm_rope_backward(ptr dq_out, ptr dk_out, ptr q, std::int64_t q_ts, std::int64_t q_hs,
                           ptr k, std::int64_t k_ts, std::int64_t k_hs, ptr q_weight,
                           ptr k_weight, ptr cos, ptr sin, ptr positions, bool pos_int64,
                           ptr q_rstd, ptr k_rstd, ptr dq, ptr dk, ptr dq_weight_partial,
                           ptr dk_weight_partial, std::int64_t partial_rows, std::int64_t tokens,
                           std::int64_t hq, std::int64_t hkv, std::int64_t head_dim,
                           std::int64_t max_pos, int x_dtype, int w_dtype, ptr stream) {
  check_qk_sizes(tokens, hq, hkv, head_dim, max_pos);
  check_arg(partial_rows >= 1 && partial_rows <= INT32_MAX,
            "partial_rows must be in [1, 2^31 - 1], got " + std::to_string(partial_rows));
  check_ptr(dq_weight_partial, "dq_weight_partial");
  check_ptr(dk_weight_partial, "dk_weight_partial");
  if (tokens == 0) {
    const std::size_t bytes = static_cast<std::size_t>(partial_rows * head_dim) * sizeof(float);
    check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(dq_weight_partial), 0, bytes, as_stream(stream)),
               "qk_norm_rope_backward: cudaMemsetAsync");
    check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(dk_weight_partial), 0, bytes, as_stream(stream)),
               "qk_norm_rope_backward: cudaMemsetAsync");
    return;
  }
  check_ptr(dq_out, "dq_out"); check_ptr(dk_out, "dk_out"); check_ptr(q, "q"); check_ptr(k, "k");
  check_ptr(q_weight, "q_weight"); check_ptr(k_weight, "k_weight"); check_ptr(cos, "cos");
  check_ptr(sin, "sin"); check_ptr(positions, "positions"); check_ptr(q_rstd, "q_rstd");
  check_ptr(k_rstd, "k_rstd"); check_ptr(dq, "dq"); check_ptr(dk, "dk");
  const QkArgs a = make_args(q, q_ts, q_hs, k, k_ts, k_hs, q_weight, k_weight, cos, sin,
                             positions, pos_int64, tokens, hq, hkv, head_dim, max_pos);
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    constexpr int V = 16 / sizeof(TX);
    const bool vec = use_vec<TX>(head_dim, {q, k, q_weight, k_weight, cos, sin, dq_out, dk_out, dq, dk},
                                 {q_ts, q_hs, k_ts, k_hs, head_dim});
    const auto launch = [&](auto kernel, int v) {
      const int tpr = threads_per_row(static_cast<int>(head_dim / 2 / v));
      const int rpb = kBwdBlock / tpr;
      const std::size_t smem = static_cast<std::size_t>(rpb) * 2 * head_dim * sizeof(float);
      check_arg(smem <= kBwdSmemBytes, "qk_norm_rope_backward: head_dim " +
                                           std::to_string(head_dim) + " is too large for the "
                                           "shared-memory dweight sums");
      kernel<<<static_cast<unsigned>(partial_rows), tpr * rpb, smem, as_stream(stream)>>>(
          a, reinterpret_cast<const TW*>(dq_out), reinterpret_cast<const TW*>(dk_out),
          reinterpret_cast<const float*>(q_rstd), reinterpret_cast<const float*>(k_rstd),
          reinterpret_cast<TX*>(dq), reinterpret_cast<TX*>(dk),
          reinterpret_cast<float*>(dq_weight_partial), reinterpret_cast<float*>(dk_weight_partial),
          tpr, rpb);
      QWEN3_FAST_CHECK_LAUNCH("qk_norm_rope_backward");
    };
    if (vec) {
      launch(qk_norm_rope_bwd_kernel<TX, TW, V>, V);
    } else {
      launch(qk_norm_rope_bwd_kernel<TX, TW, 1>, 1);
    }
  });
}

}  // namespace qwen3_fast::cuda
