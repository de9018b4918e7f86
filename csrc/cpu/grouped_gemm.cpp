// Grouped GEMM on the CPU for bfloat16 with AVX512-BF16: c[rows of g] = a[rows of g] @ b[g]^T,
// a [m, k], b [groups, n, k], c [m, n], all row-major (the "NT" form of both MoE forward
// GEMMs: x @ W_gate_up[e]^T and act @ W_down[e]^T), and the "NN" form a @ b[g] with b
// [groups, k, n] (the backward's dx = d_gate_up @ W_gate_up[e] and dy @ W_down[e]).
//
// Why not torch.matmul per expert (what ops/grouped_gemm.py does for every other case):
// with ~32 rows per expert (512 tokens, top-8 of 128) oneDNN's bf16 GEMM reorders each
// expert's weight into its blocked layout on every call and creates a primitive per new
// row count, which costs about as much as the multiply itself. Here both operands are
// read in place: a and b rows are contiguous along k, so c[i][j] is a dot product, done
// as 16 float32 lanes of vdpbf16ps (pairs of bf16 products) and one horizontal add per
// output. One parallel loop covers all (group, column block) pairs, so experts with few
// rows do not leave threads idle, and each weight row is read from memory once.
// Accumulation is float32, rounded once to bfloat16 (like torch's bf16 matmul).
// Also here: the weight gradient of groups of 1-4 rows (grouped_wgrad_small_bf16), where
// oneDNN's GEMM with a reduction length of 1-4 runs far below the write bandwidth.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "kernels.h"

#if defined(__AVX512BF16__)
#include "bf16_dot_tile.h"  // the NT micro-tiles, shared with linear.cpp
#endif

namespace qwen3_fast::cpu {

bool grouped_gemm_nt_bf16_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
namespace {

using bf16_tile::kMR;
using bf16_tile::kNR;
using bf16_tile::tile_all_rows;
constexpr std::int64_t kNBlock = 64;  // weight rows per parallel work item

// 16 bf16 columns (masked) -> 16 float32.
inline __m512 load_bf16_cols(const bf16* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 widen16(const bf16* p) {  // 16 bf16 -> 16 float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// 16 floats -> 16 bf16, round to nearest even, NaN -> 0x7fc0: from_float<bf16> lane-wise
// (vcvtneps2bf16 flushes denormals, which torch's rounding keeps).
inline __m256i round_bf16x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// NN form with vdpbf16ps: c[MR x 64] tile = a rows [MR, k] @ b panel [k, 64 columns]. Two
// b rows (kk, kk + 1) are interleaved into bf16 pairs per column (vpunpck{l,h}wd within
// each 128-bit lane) and meet the pair (a[r][kk], a[r][kk + 1]) broadcast as one 32-bit
// value: 16 columns x 2 k-steps per instruction (float32 FMAs on widened b did 16 x 1: 1.4-1.8x
// slower). The unpacks leave the columns in lane order [8L + t | 8L + 4 + t], put back by one
// two-source permute per 16 outputs.
template <int MR>
void micro_tile_nn_dp(const bf16* a, std::int64_t k, const bf16* b, std::int64_t ldb, int ncols,
                      bf16* c, std::int64_t ldc) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const __mmask32 m0 = ncols >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1ull << ncols) - 1u);
  const __mmask32 m1 = ncols >= 64 ? ~__mmask32{0}
                       : ncols <= 32 ? __mmask32{0}
                                     : static_cast<__mmask32>((1ull << (ncols - 32)) - 1u);
  for (std::int64_t kk = 0; kk < k; kk += 2) {
    const bool pair = kk + 1 < k;
    const bf16* r0 = b + kk * ldb;
    const bf16* r1 = r0 + ldb;
    __m512i bi[4];
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __mmask32 m = v ? m1 : m0;
      const __m512i lo = _mm512_maskz_loadu_epi16(m, r0 + 32 * v);
      const __m512i hi = pair ? _mm512_maskz_loadu_epi16(m, r1 + 32 * v) : _mm512_setzero_si512();
      bi[2 * v] = _mm512_unpacklo_epi16(lo, hi);
      bi[2 * v + 1] = _mm512_unpackhi_epi16(lo, hi);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      std::uint32_t bits;
      if (pair) {
        std::memcpy(&bits, a + i * k + kk, 4);
      } else {
        std::uint16_t h;
        std::memcpy(&h, a + i * k + kk, 2);
        bits = h;
      }
      const __m512bh ap = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(bits)));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ap, reinterpret_cast<__m512bh>(bi[j]));
    }
  }
  // acc[i][2v] lane 4L + t = column 32v + 8L + t; acc[i][2v + 1] lane 4L + t = 32v + 8L + 4 + t
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < 2; ++v) {
      const __m512 x0 = _mm512_permutex2var_ps(acc[i][2 * v], first, acc[i][2 * v + 1]);
      const __m512 x1 = _mm512_permutex2var_ps(acc[i][2 * v], second, acc[i][2 * v + 1]);
      const int c0 = 32 * v, left0 = ncols - c0, left1 = ncols - c0 - 16;
      bf16* ci = c + i * ldc + c0;
      if (left0 > 0)
        _mm256_mask_storeu_epi16(ci, left0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << left0) - 1u),
                                 round_bf16x16(x0));
      if (left1 > 0)
        _mm256_mask_storeu_epi16(ci + 16, left1 >= 16 ? __mmask16(0xffff) : __mmask16((1u << left1) - 1u),
                                 round_bf16x16(x1));
    }
  }
}

void tile_rows_nn(const bf16* a, std::int64_t rows, std::int64_t k, const bf16* b,
                  std::int64_t ldb, int ncols, bf16* c, std::int64_t ldc) {
  std::int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) micro_tile_nn_dp<kMR>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc);
  switch (rows - r) {
    case 3: micro_tile_nn_dp<3>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc); break;
    case 2: micro_tile_nn_dp<2>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc); break;
    case 1: micro_tile_nn_dp<1>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc); break;
    default: break;
  }
}

// NN form for a group of RB <= kStreamRows rows: b[g] ([k, n]) streamed row after row over
// the column range [j0, j1) (the whole width unless a few groups must share the threads),
// c rows accumulated in float32 in `acc` [RB, j1 - j0] (<= 32 KB: L1). Column tiles read
// b in 128-byte pieces one b row (up to 4 KB) apart, a page per row at n = 2048, and ran
// at ~8 GB/s for such groups; here each b row is one contiguous run (memory-bound).
constexpr std::int64_t kStreamRows = 4;
constexpr std::int64_t kWgradMaxRows = 4;  // grouped_wgrad_small_bf16's groups

template <int RB>
void stream_rows_nn(const bf16* a, std::int64_t k, const bf16* b, std::int64_t n,
                    std::int64_t j0, std::int64_t j1, bf16* c, float* acc) {
  const std::int64_t w = j1 - j0;
  std::fill(acc, acc + RB * w, 0.0f);
  // kU b rows per pass over acc: the float32 accumulators are loaded and stored once per kU
  // rows (still one fused multiply-add per row, in row order)
  constexpr int kU = 4;
  std::int64_t kk = 0;
  for (; kk + kU <= k; kk += kU) {
    const bf16* br = b + kk * n + j0;
    __m512 av[RB][kU];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u) av[r][u] = _mm512_set1_ps(to_float(a[r * k + kk + u]));
    std::int64_t j = 0;
    for (; j + 16 <= w; j += 16) {  // plain loads and stores (masked stores are slow on Zen 4)
      __m512 bv[kU];
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u) bv[u] = widen16(br + u * n + j);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        float* ar = acc + r * w + j;
        __m512 x = _mm512_loadu_ps(ar);
#pragma GCC unroll 4
        for (int u = 0; u < kU; ++u) x = _mm512_fmadd_ps(av[r][u], bv[u], x);
        _mm512_storeu_ps(ar, x);
      }
    }
    if (j < w) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (w - j)) - 1u);
      for (int r = 0; r < RB; ++r) {
        float* ar = acc + r * w + j;
        __m512 x = _mm512_maskz_loadu_ps(mask, ar);
        for (int u = 0; u < kU; ++u) x = _mm512_fmadd_ps(av[r][u], load_bf16_cols(br + u * n + j, mask), x);
        _mm512_mask_storeu_ps(ar, mask, x);
      }
    }
  }
  for (; kk < k; ++kk) {
    const bf16* br = b + kk * n + j0;
    for (int r = 0; r < RB; ++r) {
      const __m512 av = _mm512_set1_ps(to_float(a[r * k + kk]));
      for (std::int64_t j = 0; j < w; j += 16) {
        const std::int64_t left = w - j;
        const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
        float* ar = acc + r * w + j;
        _mm512_mask_storeu_ps(ar, mask, _mm512_fmadd_ps(av, load_bf16_cols(br + j, mask),
                                                        _mm512_maskz_loadu_ps(mask, ar)));
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (std::int64_t j = 0; j < w; ++j) c[r * n + j0 + j] = from_float<bf16>(acc[r * w + j]);
}

// The checks both forms share; returns the offsets [groups + 1].
const std::int64_t* check_grouped_args(ptr a, ptr b, ptr offsets_ptr, ptr c, std::int64_t m,
                                       std::int64_t n, std::int64_t k, std::int64_t groups) {
  check_arg(groups >= 1, "groups must be >= 1");
  check_ptr(offsets_ptr, "offsets");
  const auto* offsets = reinterpret_cast<const std::int64_t*>(offsets_ptr);
  check_arg(n > 0 && k > 0 && m >= 0, "grouped_gemm: bad sizes");
  for (std::int64_t g = 0; g < groups; ++g) {
    check_arg(offsets[g] >= 0 && offsets[g] <= offsets[g + 1] && offsets[g + 1] <= m,
              "offsets must be non-decreasing within [0, m]");
  }
  if (m > 0) { check_ptr(a, "a"); check_ptr(b, "b"); check_ptr(c, "c"); }
  return offsets;
}

// Parallel work items g * nblocks + nb: every column/weight-row block nb of every group g
// that has rows (empty experts cost nothing).
std::vector<std::int64_t> work_items(const std::int64_t* offsets, std::int64_t groups,
                                     std::int64_t nblocks) {
  std::vector<std::int64_t> items;
  for (std::int64_t g = 0; g < groups; ++g)
    if (offsets[g + 1] > offsets[g])
      for (std::int64_t nb = 0; nb < nblocks; ++nb) items.push_back(g * nblocks + nb);
  return items;
}

}  // namespace
#endif

void grouped_gemm_nn_bf16(ptr a, ptr b, ptr offsets_ptr, ptr c, std::int64_t m, std::int64_t n,
                          std::int64_t k, std::int64_t groups, int num_threads) {
#if defined(__AVX512BF16__)
  const auto* offsets = check_grouped_args(a, b, offsets_ptr, c, m, n, k, groups);
  if (m == 0) return;
  const bf16* ap = reinterpret_cast<const bf16*>(a);
  const bf16* bp = reinterpret_cast<const bf16*>(b);
  bf16* cp = reinterpret_cast<bf16*>(c);
  // Groups of <= kStreamRows rows stream their b (stream_rows_nn) over column chunks of
  // at most kStreamCols (acc <= 32 KB), split further until there are >= 2 items per thread;
  // bigger groups take the 64-column tiles (their b panel is reused from cache by every
  // row tile).
  constexpr std::int64_t kCols = 64, kStreamCols = 2048;
  const int threads = clamp_threads(num_threads);
  std::int64_t small = 0;
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t rows = offsets[g + 1] - offsets[g];
    small += rows > 0 && rows <= kStreamRows;
  }
  std::int64_t splits = std::max<std::int64_t>((n + kStreamCols - 1) / kStreamCols,
                                               small > 0 ? (2 * threads + small - 1) / small : 1);
  const std::int64_t sw = std::max<std::int64_t>(16, (n / splits + 15) / 16 * 16);
  splits = (n + sw - 1) / sw;
  const std::int64_t nblocks = std::max((n + kCols - 1) / kCols, splits);
  const std::vector<std::int64_t> items = work_items(offsets, groups, nblocks);
  const auto count = static_cast<std::int64_t>(items.size());
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(static_cast<std::size_t>(kStreamRows * std::min(n, sw)));
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t it = 0; it < count; ++it) {
      const std::int64_t g = items[it] / nblocks, nb = items[it] % nblocks;
      const std::int64_t lo = offsets[g], rows = offsets[g + 1] - lo;
      const bf16* ag = ap + lo * k;
      const bf16* bg = bp + g * k * n;
      bf16* cg = cp + lo * n;
      if (rows <= kStreamRows) {
        if (nb >= splits) continue;
        const std::int64_t j0 = nb * sw, j1 = std::min(n, j0 + sw);
        switch (rows) {
          case 1: stream_rows_nn<1>(ag, k, bg, n, j0, j1, cg, acc.data()); break;
          case 2: stream_rows_nn<2>(ag, k, bg, n, j0, j1, cg, acc.data()); break;
          case 3: stream_rows_nn<3>(ag, k, bg, n, j0, j1, cg, acc.data()); break;
          default: stream_rows_nn<4>(ag, k, bg, n, j0, j1, cg, acc.data()); break;
        }
        continue;
      }
      if (nb * kCols >= n) continue;
      const int ncols = static_cast<int>(std::min(kCols, n - nb * kCols));
      tile_rows_nn(ag, rows, k, bg + nb * kCols, n, ncols, cg + nb * kCols, n);
    }
  }
#else
  throw std::invalid_argument("grouped_gemm_nn_bf16 needs a build with AVX512-BF16");
#endif
}

#if defined(__AVX512BF16__)
namespace {
// out[i, :] = sum_r p[r, i] * q[r, :] for i in [i0, i1), R rows (p [R, np], q [R, nq],
// row-major), float32 products and sums in row order, one rounding.
template <int R>
void wgrad_rows(const bf16* p, std::int64_t np, const bf16* q, std::int64_t nq, std::int64_t i0,
                std::int64_t i1, bf16* out, bool stream) {
  for (std::int64_t i = i0; i < i1; ++i) {
    __m512 pv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) pv[r] = _mm512_set1_ps(to_float(p[r * np + i]));
    bf16* o = out + i * nq;
    std::int64_t j = 0;
    for (; j + 16 <= nq; j += 16) {
      __m512 acc = _mm512_mul_ps(pv[0], widen16(q + j));
#pragma GCC unroll 4
      for (int r = 1; r < R; ++r) acc = _mm512_fmadd_ps(pv[r], widen16(q + r * nq + j), acc);
      // streaming stores when `stream` (a large gradient is not read again soon, and skipping
      // the read-for-ownership halves the traffic) once o + j is 32-byte aligned
      if (stream && (reinterpret_cast<std::uintptr_t>(o + j) & 31) == 0)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(o + j), round_bf16x16(acc));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), round_bf16x16(acc));
    }
    for (; j < nq; ++j) {
      float acc = to_float(p[i]) * to_float(q[j]);
      for (int r = 1; r < R; ++r) acc = std::fma(to_float(p[r * np + i]), to_float(q[r * nq + j]), acc);
      o[j] = from_float<bf16>(acc);
    }
  }
}
}  // namespace
#endif

void grouped_wgrad_small_bf16(ptr p, ptr q, ptr offsets_ptr, ptr out, std::int64_t m,
                              std::int64_t np, std::int64_t nq, std::int64_t groups,
                              int num_threads) {
#if defined(__AVX512BF16__)
  const auto* offsets = check_grouped_args(p, q, offsets_ptr, out, m, nq, np, groups);
  if (m == 0) return;
  const bf16* pp = reinterpret_cast<const bf16*>(p);
  const bf16* qp = reinterpret_cast<const bf16*>(q);
  bf16* op = reinterpret_cast<bf16*>(out);
  constexpr std::int64_t kRowsPerItem = 64;  // output rows per parallel work item
  const std::int64_t nblocks = (np + kRowsPerItem - 1) / kRowsPerItem;
  std::vector<std::int64_t> items;
  std::int64_t written = 0;
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t rows = offsets[g + 1] - offsets[g];
    if (rows >= 1 && rows <= kWgradMaxRows) {
      for (std::int64_t nb = 0; nb < nblocks; ++nb) items.push_back(g * nblocks + nb);
      ++written;
    }
  }
  // streaming stores only for outputs well beyond the caches (a small model's gradient is
  // read back by the optimizer while still cached)
  const bool stream = written * np * nq * 2 >= (std::int64_t{32} << 20);
  const auto count = static_cast<std::int64_t>(items.size());
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(dynamic, 1)
  for (std::int64_t it = 0; it < count; ++it) {
    const std::int64_t g = items[it] / nblocks, nb = items[it] % nblocks;
    const std::int64_t lo = offsets[g], rows = offsets[g + 1] - lo;
    const std::int64_t i0 = nb * kRowsPerItem, i1 = std::min(np, i0 + kRowsPerItem);
    const bf16* pg = pp + lo * np;
    const bf16* qg = qp + lo * nq;
    bf16* og = op + g * np * nq;
    switch (rows) {
      case 1: wgrad_rows<1>(pg, np, qg, nq, i0, i1, og, stream); break;
      case 2: wgrad_rows<2>(pg, np, qg, nq, i0, i1, og, stream); break;
      case 3: wgrad_rows<3>(pg, np, qg, nq, i0, i1, og, stream); break;
      default: wgrad_rows<4>(pg, np, qg, nq, i0, i1, og, stream); break;
    }
    if (stream) _mm_sfence();  // the streaming stores are visible before the loop's barrier
  }
#else
  throw std::invalid_argument("grouped_wgrad_small_bf16 needs a build with AVX512-BF16");
#endif
}

void grouped_gemm_nt_bf16(ptr a, ptr b, ptr offsets_ptr, ptr c, std::int64_t m, std::int64_t n,
                          std::int64_t k, std::int64_t groups, int num_threads) {
#if defined(__AVX512BF16__)
  const auto* offsets = check_grouped_args(a, b, offsets_ptr, c, m, n, k, groups);
  if (m == 0) return;
  const bf16* ap = reinterpret_cast<const bf16*>(a);
  const bf16* bp = reinterpret_cast<const bf16*>(b);
  bf16* cp = reinterpret_cast<bf16*>(c);
  const std::int64_t nblocks = (n + kNBlock - 1) / kNBlock;
  const std::vector<std::int64_t> items = work_items(offsets, groups, nblocks);
  const auto count = static_cast<std::int64_t>(items.size());
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(dynamic, 1)
  for (std::int64_t it = 0; it < count; ++it) {
    const std::int64_t g = items[it] / nblocks, nb = items[it] % nblocks;
    const std::int64_t lo = offsets[g], rows = offsets[g + 1] - lo;
    const std::int64_t n_end = std::min(n, (nb + 1) * kNBlock);
    for (std::int64_t j0 = nb * kNBlock; j0 < n_end; j0 += kNR) {
      const int nr = static_cast<int>(std::min<std::int64_t>(kNR, n_end - j0));
      tile_all_rows(ap + lo * k, rows, bp + (g * n + j0) * k, nr, k, cp + lo * n + j0, n);
    }
  }
#else
  throw std::invalid_argument("grouped_gemm_nt_bf16 needs a build with AVX512-BF16");
#endif
}

}  // namespace qwen3_fast::cpu
