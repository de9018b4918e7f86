// Fused QK-norm + RoPE on the CPU: per head of q and k, HF Qwen3RMSNorm over head_dim and
// then the half-split rotation at the token's position, one pass over each head row.
//
// Rounding follows the unfused HF path exactly (TX input dtype, TW weight dtype = output
// dtype, the rotation runs in TW like HF's `q * cos + rotate_half(q) * sin` on the normed
// tensor): y = round_TW(w * round_TX(x * rstd)); c, s = round_TW(cos[pos]), round_TW(sin[pos]);
// out = round_TW(round_TW(y * c) -/+ round_TW(y' * s)). OpenMP splits tokens; each token
// converts its cos/sin row once and reuses it for all Hq + Hkv heads. A head row is read
// completely (into the y buffer) before its output is written, so out may alias the input
// (the in-place inference variant).
//
// Backward recomputes y from x and the saved rstd: dy = the transposed rotation of dout
// (rounded to TW like torch's autograd of the unfused ops), then the RMSNorm backward;
// dweight in per-thread float32 partials.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "qwen3_fast/norm_act_math.h"
#include "rms_norm_row.h"

// No fused multiply-add in this file: the fp32 path must round y * c and y' * s separately
// before the sum, as torch's separate elementwise ops do (GCC contracts by default).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace qwen3_fast::cpu {

namespace {

struct Heads {  // one of q / k: base pointer and strides in elements
  ptr x;
  std::int64_t tok_stride, head_stride, heads;
};

void check_qk_sizes(std::int64_t tokens, std::int64_t hq, std::int64_t hkv, std::int64_t head_dim,
                    std::int64_t max_pos) {
  check_arg(tokens >= 0, "tokens must be >= 0, got " + std::to_string(tokens));
  check_arg(hq > 0 && hkv > 0, "hq and hkv must be > 0, got " + std::to_string(hq) + ", " +
                                   std::to_string(hkv));
  check_arg(head_dim > 0 && head_dim % 2 == 0,
            "head_dim must be even and > 0, got " + std::to_string(head_dim));
  check_arg(max_pos > 0, "max_pos (rows of cos/sin) must be > 0, got " + std::to_string(max_pos));
}

inline std::int64_t load_pos(ptr positions, bool pos_int64, std::int64_t t) {
  return pos_int64 ? reinterpret_cast<const std::int64_t*>(positions)[t]
                   : static_cast<std::int64_t>(reinterpret_cast<const std::int32_t*>(positions)[t]);
}

[[noreturn]] void bad_position(std::int64_t t, std::int64_t pos, std::int64_t max_pos) {
  throw std::invalid_argument("positions: value " + std::to_string(pos) + " at token " +
                              std::to_string(t) + " is out of range [0, " +
                              std::to_string(max_pos) + ") (cos/sin have " +
                              std::to_string(max_pos) + " rows)");
}

// First out-of-range position (token index), or -1; checked before any kernel work.
std::int64_t first_bad_position(ptr positions, bool pos_int64, std::int64_t tokens,
                                std::int64_t max_pos) {
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t p = load_pos(positions, pos_int64, t);
    if (p < 0 || p >= max_pos) return t;
  }
  return -1;
}

// Calls f(integral_constant<D>) with D = head_dim for the Qwen3 sizes (64, 128) so that the
// row loops get a compile-time trip count (no remainder loops, unrolled), else D = 0
// (runtime head_dim).
template <typename F>
inline void dispatch_head_dim(std::int64_t d, F&& f) {
  if (d == 128) {
    f(std::integral_constant<std::int64_t, 128>{});
  } else if (d == 64) {
    f(std::integral_constant<std::int64_t, 64>{});
  } else {
    f(std::integral_constant<std::int64_t, 0>{});
  }
}

// cos/sin row of one token, rounded to TW (HF casts the gathered tables to the activation
// dtype before the products).
template <typename TW, std::int64_t KD>
inline void load_cos_sin(const float* cos, const float* sin, std::int64_t pos, std::int64_t d_rt,
                         float* c, float* s) {
  const std::int64_t d = KD ? KD : d_rt;
  const float* cr = cos + pos * d;
  const float* sr = sin + pos * d;
#pragma omp simd
  for (std::int64_t i = 0; i < d; ++i) {
    c[i] = round_to<TW>(cr[i]);
    s[i] = round_to<TW>(sr[i]);
  }
}

// One head row: RMSNorm into y (float, TW-rounded), then the rotation into out. Returns rstd.
template <typename TX, typename TW, std::int64_t KD>
inline float norm_rope_row(const TX* x, const TW* w, const float* c, const float* s, TW* out,
                           float* y, std::int64_t d_rt, double eps) {
  const std::int64_t d = KD ? KD : d_rt;  // KD: compile-time head_dim, or 0
  const float rs = qwen3_fast::rms_inv(sum_squares(x, d), d, eps);
#pragma omp simd
  for (std::int64_t i = 0; i < d; ++i) {
    y[i] = round_to<TW>(to_float(w[i]) * round_to<TX>(to_float(x[i]) * rs));
  }
  const std::int64_t h = d / 2;
#pragma omp simd
  for (std::int64_t i = 0; i < h; ++i) {
    const float a = y[i], b = y[i + h];
    out[i] = from_float<TW>(round_to<TW>(a * c[i]) - round_to<TW>(b * s[i]));
    out[i + h] = from_float<TW>(round_to<TW>(b * c[i + h]) + round_to<TW>(a * s[i + h]));
  }
  return rs;
}

// One head row of the backward: dx (TX) and the dweight contribution added to acc.
template <typename TX, typename TW, std::int64_t KD>
inline void norm_rope_row_bwd(const TW* g, const TX* x, const TW* w, const float* c,
                              const float* s, float rs, TX* dx, float* acc, float* dy,
                              std::int64_t d_rt) {
  const std::int64_t d = KD ? KD : d_rt;
  const std::int64_t h = d / 2;
  // out[i] = y[i] c[i] - y[i+h] s[i];  out[i+h] = y[i+h] c[i+h] + y[i] s[i+h]
#pragma omp simd
  for (std::int64_t i = 0; i < h; ++i) {
    const float ga = to_float(g[i]), gb = to_float(g[i + h]);
    dy[i] = round_to<TW>(round_to<TW>(ga * c[i]) + round_to<TW>(gb * s[i + h]));
    dy[i + h] = round_to<TW>(round_to<TW>(gb * c[i + h]) - round_to<TW>(ga * s[i]));
  }
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (std::int64_t i = 0; i < d; ++i) {
    const float n = to_float(x[i]) * rs;
    dot += dy[i] * to_float(w[i]) * n;
    acc[i] += dy[i] * round_to<TX>(n);
  }
  const float mean_dot = dot / static_cast<float>(d);
#pragma omp simd
  for (std::int64_t i = 0; i < d; ++i) {
    const float n = to_float(x[i]) * rs;
    dx[i] = from_float<TX>(rms_norm_dx(rs, dy[i] * to_float(w[i]), n, mean_dot));
  }
}

}  // namespace

void qk_norm_rope_forward(ptr q, std::int64_t q_ts, std::int64_t q_hs, ptr k, std::int64_t k_ts,
                          std::int64_t k_hs, ptr q_weight, ptr k_weight, ptr cos, ptr sin,
                          ptr positions, bool pos_int64, ptr q_out, std::int64_t qo_ts,
                          std::int64_t qo_hs, ptr k_out, std::int64_t ko_ts, std::int64_t ko_hs,
                          ptr q_rstd, ptr k_rstd, std::int64_t tokens, std::int64_t hq,
                          std::int64_t hkv, std::int64_t head_dim, std::int64_t max_pos,
                          double eps, int x_dtype, int w_dtype, int num_threads) {
  check_qk_sizes(tokens, hq, hkv, head_dim, max_pos);
  if (tokens == 0) return;
  check_ptr(q, "q"); check_ptr(k, "k"); check_ptr(q_weight, "q_weight");
  check_ptr(k_weight, "k_weight"); check_ptr(cos, "cos"); check_ptr(sin, "sin");
  check_ptr(positions, "positions"); check_ptr(q_out, "q_out"); check_ptr(k_out, "k_out");
  // Positions first: an out-of-range one raises before anything (an in-place call included)
  // is written. One scalar pass over T integers, negligible next to T * (Hq + Hkv) * D.
  const std::int64_t bad = first_bad_position(positions, pos_int64, tokens, max_pos);
  if (bad >= 0) bad_position(bad, load_pos(positions, pos_int64, bad), max_pos);
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    const float* cp = reinterpret_cast<const float*>(cos);
    const float* sp = reinterpret_cast<const float*>(sin);
    float* qr = reinterpret_cast<float*>(q_rstd);  // may be null (in-place inference)
    float* kr = reinterpret_cast<float*>(k_rstd);
    dispatch_head_dim(head_dim, [&](auto kd) {
    constexpr std::int64_t KD = decltype(kd)::value;
    const std::int64_t d = KD ? KD : head_dim;
#pragma omp parallel num_threads(clamp_threads(num_threads))
    {
      std::vector<float> buf(static_cast<std::size_t>(3 * d));
      float* c = buf.data();
      float* s = c + d;
      float* y = s + d;
#pragma omp for schedule(static)
      for (std::int64_t t = 0; t < tokens; ++t) {
        load_cos_sin<TW, KD>(cp, sp, load_pos(positions, pos_int64, t), d, c, s);
        for (std::int64_t hh = 0; hh < hq; ++hh) {
          const float rs = norm_rope_row<TX, TW, KD>(
              reinterpret_cast<const TX*>(q) + t * q_ts + hh * q_hs,
              reinterpret_cast<const TW*>(q_weight), c, s,
              reinterpret_cast<TW*>(q_out) + t * qo_ts + hh * qo_hs, y, d, eps);
          if (qr != nullptr) qr[t * hq + hh] = rs;
        }
        for (std::int64_t hh = 0; hh < hkv; ++hh) {
          const float rs = norm_rope_row<TX, TW, KD>(
              reinterpret_cast<const TX*>(k) + t * k_ts + hh * k_hs,
              reinterpret_cast<const TW*>(k_weight), c, s,
              reinterpret_cast<TW*>(k_out) + t * ko_ts + hh * ko_hs, y, d, eps);
          if (kr != nullptr) kr[t * hkv + hh] = rs;
        }
      }
    }
    });
  });
}

void qk_norm_rope_backward(ptr dq_out, ptr dk_out, ptr q, std::int64_t q_ts, std::int64_t q_hs,
                           ptr k, std::int64_t k_ts, std::int64_t k_hs, ptr q_weight,
                           ptr k_weight, ptr cos, ptr sin, ptr positions, bool pos_int64,
                           ptr q_rstd, ptr k_rstd, ptr dq, ptr dk, ptr dq_weight, ptr dk_weight,
                           std::int64_t tokens, std::int64_t hq, std::int64_t hkv,
                           std::int64_t head_dim, std::int64_t max_pos, int x_dtype, int w_dtype,
                           int num_threads) {
  check_qk_sizes(tokens, hq, hkv, head_dim, max_pos);
  check_ptr(dq_weight, "dq_weight"); check_ptr(dk_weight, "dk_weight");
  const std::int64_t d = head_dim;
  float* dqw = reinterpret_cast<float*>(dq_weight);
  float* dkw = reinterpret_cast<float*>(dk_weight);
  for (std::int64_t i = 0; i < d; ++i) dqw[i] = dkw[i] = 0.0f;
  if (tokens == 0) return;
  check_ptr(dq_out, "dq_out"); check_ptr(dk_out, "dk_out"); check_ptr(q, "q"); check_ptr(k, "k");
  check_ptr(q_weight, "q_weight"); check_ptr(k_weight, "k_weight"); check_ptr(cos, "cos");
  check_ptr(sin, "sin"); check_ptr(positions, "positions"); check_ptr(q_rstd, "q_rstd");
  check_ptr(k_rstd, "k_rstd"); check_ptr(dq, "dq"); check_ptr(dk, "dk");
  const std::int64_t bad = first_bad_position(positions, pos_int64, tokens, max_pos);
  if (bad >= 0) bad_position(bad, load_pos(positions, pos_int64, bad), max_pos);
  const int nt = static_cast<int>(std::min<std::int64_t>(clamp_threads(num_threads), tokens));
  // per thread: [dq_weight partial | dk_weight partial]
  std::vector<float> partial(static_cast<std::size_t>(nt) * 2 * d, 0.0f);
  dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    const float* cp = reinterpret_cast<const float*>(cos);
    const float* sp = reinterpret_cast<const float*>(sin);
    const float* qr = reinterpret_cast<const float*>(q_rstd);
    const float* kr = reinterpret_cast<const float*>(k_rstd);
    dispatch_head_dim(head_dim, [&](auto kd) {
    constexpr std::int64_t KD = decltype(kd)::value;
    const std::int64_t d = KD ? KD : head_dim;
#pragma omp parallel num_threads(nt)
    {
      float* acc_q = partial.data() + static_cast<std::size_t>(omp_get_thread_num()) * 2 * d;
      float* acc_k = acc_q + d;
      std::vector<float> buf(static_cast<std::size_t>(3 * d));
      float* c = buf.data();
      float* s = c + d;
      float* dy = s + d;
#pragma omp for schedule(static)
      for (std::int64_t t = 0; t < tokens; ++t) {
        load_cos_sin<TW, KD>(cp, sp, load_pos(positions, pos_int64, t), d, c, s);
        for (std::int64_t hh = 0; hh < hq; ++hh) {
          const std::int64_t row = t * hq + hh;
          norm_rope_row_bwd<TX, TW, KD>(reinterpret_cast<const TW*>(dq_out) + row * d,
                                    reinterpret_cast<const TX*>(q) + t * q_ts + hh * q_hs,
                                    reinterpret_cast<const TW*>(q_weight), c, s, qr[row],
                                    reinterpret_cast<TX*>(dq) + row * d, acc_q, dy, d);
        }
        for (std::int64_t hh = 0; hh < hkv; ++hh) {
          const std::int64_t row = t * hkv + hh;
          norm_rope_row_bwd<TX, TW, KD>(reinterpret_cast<const TW*>(dk_out) + row * d,
                                    reinterpret_cast<const TX*>(k) + t * k_ts + hh * k_hs,
                                    reinterpret_cast<const TW*>(k_weight), c, s, kr[row],
                                    reinterpret_cast<TX*>(dk) + row * d, acc_k, dy, d);
        }
      }
    }
    });
  });
  for (int th = 0; th < nt; ++th) {
    const float* acc = partial.data() + static_cast<std::size_t>(th) * 2 * d;
#pragma omp simd
    for (std::int64_t i = 0; i < d; ++i) {
      dqw[i] += acc[i];
      dkw[i] += acc[d + i];
    }
  }
}

}  // namespace qwen3_fast::cpu
