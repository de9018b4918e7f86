// Flash-decoding on the CPU over a dense or hierarchical (QuantSpec) KV cache.
//
// Work items are (sequence, kv head, chunk of tokens): split-KV. An item computes, for the
// R = (Hq/Hkv) * n query rows of one kv head at once (GQA: every key/value token is loaded
// and decoded once and used by all R rows), a partial output and its log-sum-exp with an
// online softmax over blocks of tokens. A second pass merges the chunks of each
// (sequence, kv head) by log-sum-exp. Ragged lengths: each sequence has its own chunk list.
//
// One pass covers both parts of a hierarchical cache: tokens [0, n_quant) are codes,
// tokens [n_quant, length) sit in the full-precision ring buffer at slot t % ring. The
// quantized part goes one key group (G tokens) at a time and never dequantizes a token:
// - keys are stored channel-major in a group ([D, G/2] bytes, token pairs per byte), and
//   the per-channel scale and min fold into the query: score_t = sum_d (q_d s_d/16) c_dt +
//   sum_d q_d min_d, so a query channel times a row of codes runs over 32 tokens at once;
// - values (per token groups along D) accumulate weighted codes: o_d += (p_t s_t/16) c_td
//   over 32 channels, plus a per-row scalar sum_t p_t min_t added at the end. Value codes
//   unpack in a split channel order (even channels, then odd: the two nibbles of a byte),
//   which the quantized-part accumulator keeps. Value groups that are not a multiple of 32
//   channels take a per-token dequantize path instead.
// Compute, not bandwidth, bounds this at small head counts (a 32K cache of a small model
// sits in L3): the decode of a tile of codes (nibbles -> one byte 16U + L, i.e. the code + 8
// with the 8 folded into the min terms, widened and converted once) is shared by all R rows
// of the call, which sit in one register block (up to 12 rows x 32 lanes with AVX-512), so
// the verify's R = 10 rows decode each tile once. Scores of a key tile stay in the nibble
// order (16 even tokens, then 16 odd: tok_of), which softmax and the value pass follow.
// The dense cache is the buffer-only case (ring = T, n_quant = 0). In bf16 with AVX512-BF16
// and head_dim 32/64/128/256 the buffer pass runs flash_decode_bf16.h (no float copies).
//
// Verify variant: n > 1 new tokens per sequence; query i sits at p = length - n + i and reads
// keys up to there (causal among the new tokens), codes for [0, nq_i) and the ring for
// [nq_i, p] with nq_i = kv_row_quant_len(p, ...) <= n_quant (kv_quant_math.h): the prefix
// one-token decoding of p had. Only the per-row token limits differ from decoding: the
// codes pass covers [0, n_quant) and masks t >= nq_i per row, the ring pass starts at the
// first row's nq and masks t < nq_i.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_math.h"
#include "kernels.h"
#include "qwen3_fast/kv_quant_math.h"
#if defined(__AVX512BF16__)
#include "flash_decode_bf16.h"
#endif

namespace qwen3_fast::cpu {

namespace {
constexpr int kBlock = 32;
constexpr int kTB = 16;  // code bytes per tile: 32 tokens (keys) or 32 channels (values)

// One register block covers up to kMaxRB query rows, so that a tile of codes is decoded once
// for all R = (Hq/Hkv) * n rows of a call (the verify's 10 rows at Hq/Hkv = 2, n = 5 in one
// block): the decode (byte unpacking and int -> float) is the shared part and the FMAs the
// per-row part. AVX-512: 16-lane vectors, rows x 2 accumulators <= 24 of 32 registers.
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kW = 16;
constexpr int kMaxRB = 12;
#else
constexpr int kW = 8;
constexpr int kMaxRB = 4;
#endif
constexpr int kNV = kTB / kW;  // vectors per half tile (16 even or 16 odd codes)

typedef float vf __attribute__((vector_size(kW * 4)));
typedef std::int32_t vi __attribute__((vector_size(kW * 4)));
typedef std::uint8_t v16b __attribute__((vector_size(16)));

// Not vf{} + x: adding +0.0f is no identity (-0 + 0 = +0), so GCC keeps a scalar add.
__attribute__((always_inline)) inline vf splat(float x) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return reinterpret_cast<vf>(_mm512_set1_ps(x));
#else
  return vf{x, x, x, x, x, x, x, x};
#endif
}

// kW bytes -> kW floats. GCC scalarizes __builtin_convertvector from bytes (movzbl/pinsrd
// per lane, measured), so x86 uses vpmovzxbd.
__attribute__((always_inline)) inline vf bytes_to_float(const std::uint8_t* p) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i w = _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return __builtin_convertvector(reinterpret_cast<vi>(w), vf);
#elif defined(__AVX2__)
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return __builtin_convertvector(reinterpret_cast<vi>(w), vf);
#else
  typedef std::uint8_t vb __attribute__((vector_size(kW)));
  vb b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
#endif
}

// Codes of 16 packed bytes of U (and L): c[0..kNV) the low nibbles (elements 2i), c[kNV..)
// the high ones (2i + 1), as 16U + L (8-bit; the code plus 8, the 8 folded into the min
// terms by the callers) or 16U (4-bit). The two nibbles combine into one byte first
// (16-byte vector ops), so the widening and int -> float run once per code.
template <int PREC>
__attribute__((always_inline)) inline void codes16(const std::uint8_t* u, const std::uint8_t* l,
                                                   vf* c) {
  v16b ub, lo, hi;
  std::memcpy(&ub, u, 16);
  if constexpr (PREC == 8) {
    v16b lb;
    std::memcpy(&lb, l, 16);
    lo = ((ub << 4) & 0xF0) | (lb & 0x0F);
    hi = (ub & 0xF0) | (lb >> 4);
  } else {
    lo = (ub << 4) & 0xF0;
    hi = ub & 0xF0;
  }
#if defined(__AVX512F__) && defined(__AVX512BW__)
  c[0] = __builtin_convertvector(reinterpret_cast<vi>(_mm512_maskz_cvtepu8_epi32(0xFFFF, reinterpret_cast<__m128i>(lo))), vf);
  c[1] = __builtin_convertvector(reinterpret_cast<vi>(_mm512_maskz_cvtepu8_epi32(0xFFFF, reinterpret_cast<__m128i>(hi))), vf);
#else
  alignas(16) std::uint8_t buf[32];
  std::memcpy(buf, &lo, 16);
  std::memcpy(buf + 16, &hi, 16);
  for (int i = 0; i < 2 * kNV; ++i) c[i] = bytes_to_float(buf + i * kW);
#endif
}

// Position k of a key group's score row -> token offset in the group. Whole tiles of 32
// tokens hold the 16 even tokens, then the 16 odd ones (the nibble order of the packed
// bytes, so the decode needs no interleave); a tail (full <= k) is in token order.
__attribute__((always_inline)) inline std::int64_t tok_of(std::int64_t k, std::int64_t full) {
  return k < full ? ((k & ~std::int64_t{31}) | ((k & 15) << 1) | ((k >> 4) & 1)) : k;
}

// Calls f(std::integral_constant<int, nr>) for 1 <= nr <= N.
template <int N, typename F>
__attribute__((always_inline)) inline void with_rows(std::int64_t nr, F&& f) {
  if constexpr (N >= 1) {
    if (nr == N) f(std::integral_constant<int, N>{});
    else with_rows<N - 1>(nr, f);
  }
}


template <typename T>
struct FD {
  const T* q;
  const std::uint8_t *ku, *kl, *vu, *vl;
  const T *kmin, *kscale, *vmin, *vscale, *kbuf, *vbuf;
  const std::int32_t *nq, *len;
  std::int64_t B, Hq, Hkv, n, D, Tq, ring, G, Gv;
  float scale;
};

struct Item { std::int64_t b, h, t0, t1; };

// 16 lane partial sums then a tree: `omp simd reduction` leaves GCC a serial chain of 16
// scalar adds per dot, which dominated the kernel (perf), while the tree is 4 short steps.
constexpr int kLanes = 16;
__attribute__((always_inline)) inline float dot(const float* a, const float* b, std::int64_t d) {
  float part[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  }
  for (int l = 0; i + l < d; ++l) part[l] += a[i + l] * b[i + l];
#pragma omp simd
  for (int l = 0; l < 8; ++l) part[l] += part[l + 8];
#pragma omp simd
  for (int l = 0; l < 4; ++l) part[l] += part[l + 4];
  return (part[0] + part[2]) + (part[1] + part[3]);
}

__attribute__((always_inline)) inline void axpy(float* acc, float w, const float* x, std::int64_t d) {
#pragma omp simd
  for (std::int64_t i = 0; i < d; ++i) acc[i] += w * x[i];
}

inline void scale_row(float* acc, float a, std::int64_t d) {
#pragma omp simd
  for (std::int64_t i = 0; i < d; ++i) acc[i] *= a;
}

// Codes of one packed row into floats in split order: out[i] = even i, out[D/2 + i] = odd.
template <int PREC>
inline void unpack_codes(const std::uint8_t* u, const std::uint8_t* l, float* out,
                         std::int64_t half) {
  if constexpr (PREC == 8) {
#pragma omp simd
    for (std::int64_t i = 0; i < half; ++i) {
      const int ub = u[i], lb = l[i];
      out[i] = static_cast<float>(16 * (ub & 15) + (lb & 15) - 8);
      out[half + i] = static_cast<float>(16 * (ub >> 4) + (lb >> 4) - 8);
    }
  } else {
#pragma omp simd
    for (std::int64_t i = 0; i < half; ++i) {
      const int ub = u[i];
      out[i] = static_cast<float>(16 * (ub & 15));
      out[half + i] = static_cast<float>(16 * (ub >> 4));
    }
  }
}

// Thread scratch for one item.
struct Scratch {
  std::vector<float> qn, accn, accs, kf, vf, s, m, l, kst, kmn;
  std::vector<float> qk, qm, accm, vsk, vmk, ws;
  std::vector<std::int64_t> limit, nqr, lo, hi;  // per row: position, nq_i, pass bounds
  std::int64_t ld = kBlock;  // row stride of s
  std::int64_t ngv = 1;      // value groups per token
  void init(std::int64_t R, std::int64_t D, std::int64_t ngv, std::int64_t G) {
    ld = std::max<std::int64_t>(kBlock, G);
    qn.assign(R * D, 0); accn.assign(R * D, 0); accs.assign(R * D, 0);
    kf.assign(D, 0); vf.assign(D, 0); s.assign(R * ld, 0); m.assign(R, 0); l.assign(R, 0);
    kst.assign(D, 0); kmn.assign(D, 0); limit.assign(R, 0);
    nqr.assign(R, 0); lo.assign(R, 0); hi.assign(R, 0);
    this->ngv = ngv;
    qk.assign(R * D, 0); qm.assign(R, 0); accm.assign(R * ngv, 0);
    vsk.assign(ngv * G, 0); vmk.assign(ngv * G, 0); ws.assign(R * ld, 0);
  }
};

// Online-softmax update of R rows with a block of `nb` scores (row stride sc.ld) for
// tokens t0 + tok_of(j, full), row r taking tokens in [sc.lo[r], sc.hi[r]] (the pass's
// bounds); fills sc.s with the probabilities and rescales the accumulators. full = 0: token
// order (the ring).
inline void softmax_block(Scratch& sc, std::int64_t R, std::int64_t D, std::int64_t nb,
                          std::int64_t t0, std::int64_t full) {
  const std::int64_t ngv = sc.ngv;
  for (std::int64_t r = 0; r < R; ++r) {
    float* sr = sc.s.data() + r * sc.ld;
    const std::int64_t lo = sc.lo[r], hi = sc.hi[r];
    if (lo > t0 + nb - 1 || hi < t0) {  // no token of the block: nothing changes
      std::fill(sr, sr + nb, 0.0f);
      continue;
    }
    float mx = sc.m[r];
    if (lo <= t0 && hi >= t0 + nb - 1) {  // the whole block (all rows of a decode step)
#pragma omp simd reduction(max : mx)
      for (std::int64_t j = 0; j < nb; ++j) mx = sr[j] > mx ? sr[j] : mx;
    } else {
      for (std::int64_t j = 0; j < nb; ++j) {
        const std::int64_t t = t0 + tok_of(j, full);
        const bool ok = t >= lo && t <= hi;
        sr[j] = ok ? sr[j] : -INFINITY;
        mx = sr[j] > mx ? sr[j] : mx;
      }
    }
    const float alpha = vexp(sc.m[r] - mx);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t j = 0; j < nb; ++j) {
      const float p = sr[j] == -INFINITY ? 0.0f : vexp(sr[j] - mx);
      sr[j] = p;
      sum += p;
    }
    if (alpha != 1.0f) {
      scale_row(sc.accn.data() + r * D, alpha, D);
      scale_row(sc.accs.data() + r * D, alpha, D);
      scale_row(sc.accm.data() + r * ngv, alpha, ngv);
    }
    sc.l[r] = sc.l[r] * alpha + sum;
    sc.m[r] = mx;
  }
}

// Scores of NR query rows (qk: [NR, D] with s/16 folded in, qm: [NR] the min terms) against
// 32 tokens of one key group: u, l point at the tile's first byte of channel 0, channels
// `pairs` bytes apart. Writes s[r * ld + j], j = 0..31 in tile order (tok_of).
template <int PREC, int NR>
inline void key_tile(const std::uint8_t* u, const std::uint8_t* l, std::int64_t pairs,
                     const float* qk, const float* qm, std::int64_t D, float* s,
                     std::int64_t ld) {
  vf acc[NR][2 * kNV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int i = 0; i < 2 * kNV; ++i) acc[r][i] = splat(qm[r]);
  }
  for (std::int64_t d = 0; d < D; ++d) {
    vf c[2 * kNV];
    codes16<PREC>(u + d * pairs, l + d * pairs, c);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const vf qv = splat(qk[r * D + d]);
#pragma GCC unroll 4
      for (int i = 0; i < 2 * kNV; ++i) acc[r][i] += qv * c[i];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int i = 0; i < 2 * kNV; ++i) std::memcpy(s + r * ld + i * kW, &acc[r][i], sizeof(vf));
  }
}

// The same for a tail of w < kTB bytes (2w tokens, token order), scalar.
template <int PREC>
inline void key_tail(const std::uint8_t* u, const std::uint8_t* l, std::int64_t pairs, int w,
                     const float* qk, const float* qm, std::int64_t D, float* s,
                     std::int64_t ld, std::int64_t nr) {
  for (std::int64_t r = 0; r < nr; ++r) {
    float* sr = s + r * ld;
    for (int j = 0; j < 2 * w; ++j) sr[j] = qm[r];
    for (std::int64_t d = 0; d < D; ++d) {
      const float qv = qk[r * D + d];
      for (int i = 0; i < w; ++i) {
        const int ub = u[d * pairs + i], lb = PREC == 8 ? l[d * pairs + i] : 0;
        const int c0 = 16 * kv_lo(ub) + kv_lo(lb), c1 = 16 * kv_hi(ub) + kv_hi(lb);
        sr[2 * i] += qv * static_cast<float>(c0);
        sr[2 * i + 1] += qv * static_cast<float>(c1);
      }
    }
  }
}

// Weighted value codes of `nt` score positions for NR rows over one tile of 32 channels (16
// bytes at byte b0 of each token row, rows `half` bytes apart; position k is token
// tok_of(k, full)): acc[r][b0 + i] += even channel 2(b0 + i), acc[r][half + b0 + i] += odd,
// weighted by w[r * ld + k] (the probability times the token's value scale / 16).
template <int PREC, int NR>
inline void value_tile(const std::uint8_t* u, const std::uint8_t* l, std::int64_t half,
                       std::int64_t nt, std::int64_t full, const float* w, std::int64_t ld,
                       float* acc, std::int64_t D, std::int64_t b0) {
  vf a[NR][2 * kNV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int i = 0; i < 2 * kNV; ++i) a[r][i] = vf{};
  }
  for (std::int64_t k = 0; k < nt; ++k) {
    const std::int64_t t = tok_of(k, full);
    vf c[2 * kNV];
    codes16<PREC>(u + t * half, l + t * half, c);
    // The same row loop as key_tile's, written out on purpose: a shared helper taking the
    // accumulators by pointer made GCC keep them in memory (verify step 10 -> 13 ms).
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const vf wv = splat(w[r * ld + k]);
#pragma GCC unroll 4
      for (int i = 0; i < 2 * kNV; ++i) a[r][i] += wv * c[i];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    float* ar = acc + r * D;
#pragma GCC unroll 4
    for (int i = 0; i < kNV; ++i) {
      vf e, o;
      std::memcpy(&e, ar + b0 + i * kW, sizeof(vf));
      std::memcpy(&o, ar + half + b0 + i * kW, sizeof(vf));
      e += a[r][i];
      o += a[r][kNV + i];
      std::memcpy(ar + b0 + i * kW, &e, sizeof(vf));
      std::memcpy(ar + half + b0 + i * kW, &o, sizeof(vf));
    }
  }
}

// dst[j] = src[tok_of(j, full) * stride] * mul for j < n (per-token value scales or mins
// of a group in score order). stride 1 (one value group per token) gets its own loop, which
// GCC vectorizes (the conversion was 14% of a decode step as a scalar loop).
template <typename T>
inline void to_split_order(const T* src, std::int64_t stride, float mul, float* dst,
                           std::int64_t n, std::int64_t full) {
  if (stride == 1) {
    for (std::int64_t b = 0; b < full; b += 2 * kTB) {
#pragma omp simd
      for (int i = 0; i < kTB; ++i) {
        dst[b + i] = to_float(src[b + 2 * i]) * mul;
        dst[b + kTB + i] = to_float(src[b + 2 * i + 1]) * mul;
      }
    }
  } else {
    for (std::int64_t j = 0; j < full; ++j) dst[j] = to_float(src[tok_of(j, full) * stride]) * mul;
  }
  for (std::int64_t j = full; j < n; ++j) dst[j] = to_float(src[j * stride]) * mul;
}

// Row blocks of at most kMaxRB rows, as even as possible: calls f(r0, nr).
template <typename F>
inline void row_blocks(std::int64_t R, F&& f) {
  const std::int64_t nb = (R + kMaxRB - 1) / kMaxRB, per = (R + nb - 1) / nb;
  for (std::int64_t r0 = 0; r0 < R; r0 += per) f(r0, std::min(per, R - r0));
}

template <typename T, int PREC>
void run_item(const FD<T>& a, const Item& it, Scratch& sc, float* o_part, float* lse_part) {
  const std::int64_t D = a.D, half = D / 2, groups = a.Hq / a.Hkv, R = groups * a.n;
  const std::int64_t bh = it.b * a.Hkv + it.h;
  const std::int64_t len = a.len[it.b];
  const std::int64_t nq = PREC == 16 ? 0 : a.nq[it.b];
  const std::int64_t ngv = D / a.Gv;
  const T* q = a.q + (it.b * a.Hq + it.h * groups) * a.n * D;
  for (std::int64_t r = 0; r < R; ++r) {
    float* qn = sc.qn.data() + r * D;
    for (std::int64_t d = 0; d < D; ++d) qn[d] = to_float(q[r * D + d]) * a.scale;
    sc.limit[r] = len - a.n + (r % a.n);
    sc.nqr[r] = PREC == 16 ? 0 : kv_row_quant_len(sc.limit[r], len, nq, a.G, a.ring);
    sc.lo[r] = 0;
    sc.hi[r] = std::min(sc.nqr[r] - 1, sc.limit[r]);  // the codes pass: t < nq_i, t <= p
    sc.m[r] = -1e30f;
    sc.l[r] = 0.0f;
  }
  std::fill(sc.accn.begin(), sc.accn.end(), 0.0f);
  std::fill(sc.accs.begin(), sc.accs.end(), 0.0f);
  std::fill(sc.accm.begin(), sc.accm.end(), 0.0f);

  // ---- quantized tokens [t0, min(t1, nq)): whole key groups (chunks are multiples of G)
  if constexpr (PREC != 16) {
    const std::int64_t qe = std::min(it.t1, nq);
    const std::int64_t G = a.G, pairs = G / 2, ng = a.Tq / G;
    const std::int64_t full = pairs / kTB * 2 * kTB;  // positions in whole tiles
    const bool fast_values = a.Gv % 32 == 0;
    // the 8-bit codes come as c + 8 (codes16): 8 code units fold into the min terms
    const float off = PREC == 8 ? 8.0f : 0.0f;
    for (std::int64_t t0 = it.t0; t0 < qe; t0 += G) {
      const std::int64_t g = t0 / G;
      // fold the group's per-channel scale/16 and min into the query rows
      const T* ks = a.kscale + (bh * ng + g) * D;
      const T* km = a.kmin + (bh * ng + g) * D;
      for (std::int64_t d = 0; d < D; ++d) {
        sc.kst[d] = to_float(ks[d]) * 0.0625f;
        sc.kmn[d] = to_float(km[d]);
      }
      for (std::int64_t r = 0; r < R; ++r) {
        const float* qn = sc.qn.data() + r * D;
        float* qk = sc.qk.data() + r * D;
        float mterm = 0.0f;
        for (std::int64_t d = 0; d < D; ++d) {
          qk[d] = qn[d] * sc.kst[d];
          mterm += qn[d] * (sc.kmn[d] - off * sc.kst[d]);
        }
        sc.qm[r] = mterm;
      }
      const std::uint8_t* ug = a.ku + (bh * ng + g) * D * pairs;
      const std::uint8_t* lg = a.kl + (bh * ng + g) * D * pairs;
      row_blocks(R, [&](std::int64_t r0, std::int64_t nr) {
        const float* qk = sc.qk.data() + r0 * D;
        const float* qm = sc.qm.data() + r0;
        float* s = sc.s.data() + r0 * sc.ld;
        std::int64_t j0 = 0;
        for (; j0 + kTB <= pairs; j0 += kTB) {
          with_rows<kMaxRB>(nr, [&](auto NR) {
            key_tile<PREC, decltype(NR)::value>(ug + j0, lg + j0, pairs, qk, qm, D, s + 2 * j0, sc.ld);
          });
        }
        if (j0 < pairs)
          key_tail<PREC>(ug + j0, lg + j0, pairs, static_cast<int>(pairs - j0), qk, qm, D,
                         s + 2 * j0, sc.ld, nr);
      });
      softmax_block(sc, R, D, G, t0, full);
      // values of the group: per-token scale/16 and min per value group, in score order
      const std::int64_t row0 = bh * a.Tq + t0;
      const T* vs = a.vscale + row0 * ngv;
      const T* vm = a.vmin + row0 * ngv;
      for (std::int64_t k = 0; k < ngv; ++k) {
        to_split_order(vs + k, ngv, 0.0625f, sc.vsk.data() + k * G, G, full);
        to_split_order(vm + k, ngv, 1.0f, sc.vmk.data() + k * G, G, full);
      }
      if (fast_values) {
        const std::uint8_t* vug = a.vu + row0 * half;
        const std::uint8_t* vlg = a.vl + row0 * half;
        for (std::int64_t r = 0; r < R; ++r) {
          const float* pr = sc.s.data() + r * sc.ld;
          for (std::int64_t k = 0; k < ngv; ++k) {
            const float* mk = sc.vmk.data() + k * G;
            const float* sk = sc.vsk.data() + k * G;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (std::int64_t t = 0; t < G; ++t) acc += pr[t] * (mk[t] - off * sk[t]);
            sc.accm[r * ngv + k] += acc;
          }
        }
        for (std::int64_t b0 = 0; b0 < half; b0 += kTB) {
          const std::int64_t k = 2 * b0 / a.Gv;  // the tile's 32 channels share a group
          if (b0 == 0 || 2 * b0 % a.Gv == 0) {  // weights: probability x value scale / 16
            const float* sk = sc.vsk.data() + k * G;
            for (std::int64_t r = 0; r < R; ++r) {
              const float* pr = sc.s.data() + r * sc.ld;
              float* wr = sc.ws.data() + r * sc.ld;
#pragma omp simd
              for (std::int64_t t = 0; t < G; ++t) wr[t] = pr[t] * sk[t];
            }
          }
          row_blocks(R, [&](std::int64_t r0, std::int64_t nr) {
            with_rows<kMaxRB>(nr, [&](auto NR) {
              value_tile<PREC, decltype(NR)::value>(vug + b0, vlg + b0, half, G, full,
                                                    sc.ws.data() + r0 * sc.ld, sc.ld,
                                                    sc.accs.data() + r0 * D, D, b0);
            });
          });
        }
      } else {  // value groups narrower than a tile: dequantize token by token
        const std::int64_t gh = a.Gv / 2;  // split-order channels per value group, per half
        for (std::int64_t j = 0; j < G; ++j) {
          const std::int64_t row = row0 + tok_of(j, full);
          unpack_codes<PREC>(a.vu + row * half, a.vl + row * half, sc.vf.data(), half);
          float* vf = sc.vf.data();
          for (std::int64_t k = 0; k < ngv; ++k) {
            const float st = sc.vsk[k * G + j], mn = sc.vmk[k * G + j];
#pragma omp simd
            for (std::int64_t i = k * gh; i < (k + 1) * gh; ++i) {
              vf[i] = vf[i] * st + mn;
              vf[half + i] = vf[half + i] * st + mn;
            }
          }
          for (std::int64_t r = 0; r < R; ++r) {
            const float p = sc.s[r * sc.ld + j];
            if (p != 0.0f) axpy(sc.accs.data() + r * D, p, vf, D);
          }
        }
      }
    }
  }

  // ---- full-precision tokens [max(t0, nq of the first row), t1) from the ring buffer
  for (std::int64_t r = 0; r < R; ++r) {
    sc.lo[r] = sc.nqr[r];
    sc.hi[r] = sc.limit[r];
  }
#if defined(__AVX512BF16__)
  bool split = false;  // accn in bf16_value_accumulate's pair-split order
#endif
  for (std::int64_t t0 = std::max(it.t0, sc.nqr[0]); t0 < it.t1;) {
    const int nb = static_cast<int>(std::min<std::int64_t>(kBlock, it.t1 - t0));
    // ring slots of the block's tokens (row offsets in units of D), wrapped without a
    // division per token
    std::int64_t slot[kBlock];
    {
      std::int64_t r0 = t0 % a.ring;
      for (int j = 0; j < nb; ++j, ++r0) {
        if (r0 == a.ring) r0 = 0;
        slot[j] = (bh * a.ring + r0) * D;
      }
    }
    bool scored = false;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16>) {
      if (const int nc = fd_bf16::bf16_key_chunks(D)) {
        const bf16* rows[kBlock];
        for (int j = 0; j < nb; ++j) rows[j] = a.kbuf + slot[j];
        switch (nc) {
          case 1: fd_bf16::bf16_key_scores<1>(q, R, rows, nb, a.scale, sc.s.data(), sc.ld); break;
          case 2: fd_bf16::bf16_key_scores<2>(q, R, rows, nb, a.scale, sc.s.data(), sc.ld); break;
          case 4: fd_bf16::bf16_key_scores<4>(q, R, rows, nb, a.scale, sc.s.data(), sc.ld); break;
          default: fd_bf16::bf16_key_scores<8>(q, R, rows, nb, a.scale, sc.s.data(), sc.ld); break;
        }
        scored = true;
      }
    }
#endif
    for (int j = 0; j < nb && !scored; ++j) {
      const T* kr = a.kbuf + slot[j];
      float* kf = sc.kf.data();
#pragma omp simd
      for (std::int64_t d = 0; d < D; ++d) kf[d] = to_float(kr[d]);
      for (std::int64_t r = 0; r < R; ++r) sc.s[r * sc.ld + j] = dot(sc.qn.data() + r * D, kf, D);
    }
    softmax_block(sc, R, D, nb, t0, 0);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, bf16>) {
      if (scored) {  // the bf16 path: accn in pair-split order until the pass ends
        const bf16* rows[kBlock];
        for (int j = 0; j < nb; ++j) rows[j] = a.vbuf + slot[j];
        float* p = sc.s.data();
        switch (fd_bf16::bf16_key_chunks(D)) {
          case 1: fd_bf16::bf16_value_accumulate<1>(p, sc.ld, R, rows, nb, sc.accn.data()); break;
          case 2: fd_bf16::bf16_value_accumulate<2>(p, sc.ld, R, rows, nb, sc.accn.data()); break;
          case 4: fd_bf16::bf16_value_accumulate<4>(p, sc.ld, R, rows, nb, sc.accn.data()); break;
          default: fd_bf16::bf16_value_accumulate<8>(p, sc.ld, R, rows, nb, sc.accn.data()); break;
        }
        split = true;
        t0 += nb;
        continue;
      }
    }
#endif
    for (int j = 0; j < nb; ++j) {
      const T* vr = a.vbuf + slot[j];
      float* vf = sc.vf.data();
#pragma omp simd
      for (std::int64_t d = 0; d < D; ++d) vf[d] = to_float(vr[d]);
      for (std::int64_t r = 0; r < R; ++r) {
        const float p = sc.s[r * sc.ld + j];
        if (p != 0.0f) axpy(sc.accn.data() + r * D, p, vf, D);
      }
    }
    t0 += nb;
  }
#if defined(__AVX512BF16__)
  if (split) fd_bf16::bf16_unsplit_rows(sc.accn.data(), R, D);
#endif

  for (std::int64_t r = 0; r < R; ++r) {
    const float lr = sc.l[r];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    const float* an = sc.accn.data() + r * D;
    const float* as = sc.accs.data() + r * D;
    float* o = o_part + r * D;
    const float* am = sc.accm.data() + r * ngv;
    for (std::int64_t i = 0; i < half; ++i) {
      const float mt = am[2 * i / a.Gv];  // both channels of a byte share a value group
      o[2 * i] = (an[2 * i] + as[i] + mt) * inv;
      o[2 * i + 1] = (an[2 * i + 1] + as[half + i] + mt) * inv;
    }
    lse_part[r] = lr > 0.0f ? sc.m[r] + std::log(lr) : -INFINITY;
  }
}

template <typename T, int PREC>
void run(const FD<T>& a, T* out, int threads) {
  const std::int64_t D = a.D, R = (a.Hq / a.Hkv) * a.n;
  // Chunking: aim at ~8 items per thread over the whole batch, chunks >= 256 tokens and a
  // multiple of G (a chunk never splits a key group's scale load across items needlessly).
  std::int64_t total = 0;
  for (std::int64_t b = 0; b < a.B; ++b) total += a.len[b];
  const std::int64_t align = PREC == 16 ? 64 : a.G;
  std::int64_t chunk = std::max<std::int64_t>(256, (total * a.Hkv + 8 * threads - 1) / (8 * threads));
  chunk = (chunk + align - 1) / align * align;
  std::vector<Item> items;
  std::vector<std::int64_t> first(a.B * a.Hkv + 1, 0);
  for (std::int64_t b = 0; b < a.B; ++b) {
    for (std::int64_t h = 0; h < a.Hkv; ++h) {
      first[b * a.Hkv + h] = static_cast<std::int64_t>(items.size());
      for (std::int64_t t = 0; t < a.len[b]; t += chunk) items.push_back({b, h, t, std::min<std::int64_t>(a.len[b], t + chunk)});
    }
  }
  first[a.B * a.Hkv] = static_cast<std::int64_t>(items.size());
  const std::int64_t ni = static_cast<std::int64_t>(items.size());
  std::vector<float> o_part(static_cast<std::size_t>(ni * R * D));
  std::vector<float> lse_part(static_cast<std::size_t>(ni * R));
  const std::int64_t groups = a.Hq / a.Hkv;
#pragma omp parallel num_threads(threads)
  {
    Scratch sc;
    sc.init(R, D, D / a.Gv, PREC == 16 ? 1 : a.G);
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < ni; ++i) run_item<T, PREC>(a, items[i], sc, o_part.data() + i * R * D, lse_part.data() + i * R);
#pragma omp for schedule(static)
    for (std::int64_t bh = 0; bh < a.B * a.Hkv; ++bh) {
      const std::int64_t i0 = first[bh], i1 = first[bh + 1];
      const std::int64_t b = bh / a.Hkv, h = bh % a.Hkv;
      T* o = out + (b * a.Hq + h * groups) * a.n * D;
      for (std::int64_t r = 0; r < R; ++r) {
        float mx = -INFINITY;
        for (std::int64_t i = i0; i < i1; ++i) mx = std::max(mx, lse_part[i * R + r]);
        float* acc = sc.kf.data();
        std::fill(acc, acc + D, 0.0f);
        float wsum = 0.0f;
        for (std::int64_t i = i0; i < i1; ++i) {
          const float w = lse_weight(lse_part[i * R + r], mx);
          if (w == 0.0f) continue;
          wsum += w;
          axpy(acc, w, o_part.data() + (i * R + r) * D, D);
        }
        const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
        for (std::int64_t d = 0; d < D; ++d) o[r * D + d] = from_float<T>(acc[d] * inv);
      }
    }
  }
}
}  // namespace

void flash_decode(ptr q, ptr k_u, ptr k_l, ptr k_min, ptr k_scale, ptr v_u, ptr v_l,
                  ptr v_min, ptr v_scale, ptr k_buf, ptr v_buf, ptr n_quant, ptr lengths,
                  ptr out, std::int64_t batch, std::int64_t heads_q, std::int64_t heads_kv,
                  std::int64_t n_new, std::int64_t head_dim, std::int64_t quant_tokens,
                  std::int64_t ring, std::int64_t group, std::int64_t value_group,
                  int precision, double scale, int dtype, int num_threads) {
  check_arg(precision == 16 || precision == 8 || precision == 4,
            "flash_decode: precision must be 16, 8 or 4, got " + std::to_string(precision));
  check_arg(batch >= 0 && heads_kv > 0 && heads_q % heads_kv == 0 && n_new > 0 && head_dim > 0 &&
                head_dim % 2 == 0 && ring > 0,
            "flash_decode: bad sizes");
  if (precision != 16) {
    check_arg(group > 0 && quant_tokens % group == 0 && value_group > 0 && value_group % 2 == 0 &&
                  head_dim % value_group == 0,
              "flash_decode: bad group sizes");
  }
  if (batch == 0) return;
  check_ptr(q, "q"); check_ptr(k_buf, "k_buf"); check_ptr(v_buf, "v_buf");
  check_ptr(lengths, "lengths"); check_ptr(out, "out");
  const auto* lp = reinterpret_cast<const std::int32_t*>(lengths);
  const auto* qp = reinterpret_cast<const std::int32_t*>(n_quant);
  for (std::int64_t b = 0; b < batch; ++b) {
    check_arg(lp[b] >= n_new, "flash_decode: sequence " + std::to_string(b) + " has length " +
                                  std::to_string(lp[b]) + " < n_new " + std::to_string(n_new));
    if (precision == 16) {
      check_arg(lp[b] <= ring, "flash_decode: length exceeds the cache capacity");
    } else {
      check_ptr(n_quant, "n_quant");
      check_arg(qp[b] >= 0 && qp[b] <= quant_tokens && qp[b] % group == 0 && lp[b] - qp[b] <= ring &&
                    lp[b] >= qp[b],
                "flash_decode: inconsistent n_quant/lengths for sequence " + std::to_string(b));
    }
  }
  const int threads = clamp_threads(num_threads);
  dispatch_dtype(dtype, "q", [&](auto tx) {
    using T = typename decltype(tx)::type;
    FD<T> a{reinterpret_cast<const T*>(q),
            reinterpret_cast<const std::uint8_t*>(k_u), reinterpret_cast<const std::uint8_t*>(k_l),
            reinterpret_cast<const std::uint8_t*>(v_u), reinterpret_cast<const std::uint8_t*>(v_l),
            reinterpret_cast<const T*>(k_min), reinterpret_cast<const T*>(k_scale),
            reinterpret_cast<const T*>(v_min), reinterpret_cast<const T*>(v_scale),
            reinterpret_cast<const T*>(k_buf), reinterpret_cast<const T*>(v_buf),
            qp, lp, batch, heads_q, heads_kv, n_new, head_dim, quant_tokens, ring,
            precision == 16 ? 1 : group, precision == 16 ? head_dim : value_group,
            static_cast<float>(scale)};
    T* op = reinterpret_cast<T*>(out);
    if (precision == 16) run<T, 16>(a, op, threads);
    else if (precision == 8) run<T, 8>(a, op, threads);
    else run<T, 4>(a, op, threads);
  });
}

}  // namespace qwen3_fast::cpu
