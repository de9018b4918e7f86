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
#include <algorithm>
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

// NN form: c[MR x 64] tile = a rows [MR, k] @ b panel [k, 64 columns] (row stride ldb),
// float32 FMA with a broadcast of a[i][kk] against 16 converted b columns at a time.
inline __m512 load_bf16_cols(const bf16* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int MR>
void micro_tile_nn(const bf16* a, std::int64_t k, const bf16* b, std::int64_t ldb, int ncols,
                   bf16* c, std::int64_t ldc) {
  constexpr int kV = 4;  // 4 x 16 columns
  __m512 acc[MR][kV];
  __mmask16 mask[kV];
  for (int j = 0; j < kV; ++j) {
    const int left = ncols - 16 * j;
    mask[j] = left >= 16 ? __mmask16(0xffff) : (left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u));
    for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_setzero_ps();
  }
  for (std::int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[kV];
    for (int j = 0; j < kV; ++j) bv[j] = load_bf16_cols(b + kk * ldb + 16 * j, mask[j]);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(to_float(a[i * k + kk]));
      for (int j = 0; j < kV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  alignas(64) float tmp[16];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < kV; ++j) {
      _mm512_store_ps(tmp, acc[i][j]);
      const int n = std::min(16, ncols - 16 * j);
      for (int q = 0; q < n; ++q) c[i * ldc + 16 * j + q] = from_float<bf16>(tmp[q]);
    }
  }
}

void tile_rows_nn(const bf16* a, std::int64_t rows, std::int64_t k, const bf16* b,
                  std::int64_t ldb, int ncols, bf16* c, std::int64_t ldc) {
  std::int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) micro_tile_nn<kMR>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc);
  switch (rows - r) {
    case 3: micro_tile_nn<3>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc); break;
    case 2: micro_tile_nn<2>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc); break;
    case 1: micro_tile_nn<1>(a + r * k, k, b, ldb, ncols, c + r * ldc, ldc); break;
    default: break;
  }
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
  constexpr std::int64_t kCols = 64;
  const std::int64_t nblocks = (n + kCols - 1) / kCols;
  const std::vector<std::int64_t> items = work_items(offsets, groups, nblocks);
  const auto count = static_cast<std::int64_t>(items.size());
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(dynamic, 1)
  for (std::int64_t it = 0; it < count; ++it) {
    const std::int64_t g = items[it] / nblocks, nb = items[it] % nblocks;
    const std::int64_t lo = offsets[g], rows = offsets[g + 1] - lo;
    const int ncols = static_cast<int>(std::min(kCols, n - nb * kCols));
    tile_rows_nn(ap + lo * k, rows, k, bp + g * k * n + nb * kCols, n, ncols,
                 cp + lo * n + nb * kCols, n);
  }
#else
  throw std::invalid_argument("grouped_gemm_nn_bf16 needs a build with AVX512-BF16");
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
