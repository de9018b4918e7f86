// MoE token permutation on the CPU: counting sort of the (token, slot) pairs by expert,
// row gather into expert-contiguous order, and the weighted combine back to token order.
//
// Layout (shared with ops/moe_permute.py): a "slot" s = t * top_k + k is the k-th expert
// choice of token t; row_map[s] is the row of that slot in the expert-sorted buffer;
// offsets[e]..offsets[e+1] are expert e's rows. The sort is stable (rows of one expert in
// token order), so results do not depend on the thread count.
//
// Rounding follows HF's Qwen3MoeSparseMoeBlock in the model dtype T: each expert output
// is multiplied by the routing weight rounded to T and the product rounded to T; unlike
// HF's index_add in T, the top_k products of one token are summed in float32 and rounded
// once (more accurate, at most one rounding away from HF per element).
#include <vector>

#include "cpu_math.h"
#include "kernels.h"

namespace qwen3_fast::cpu {

namespace {
void check_row_map(const std::int64_t* rm, std::int64_t slots, std::int64_t rows) {
  for (std::int64_t s = 0; s < slots; ++s) {
    check_arg(rm[s] >= 0 && rm[s] < rows, "row_map[" + std::to_string(s) + "] = " +
              std::to_string(rm[s]) + " is outside [0, " + std::to_string(rows) + ")");
  }
}
}  // namespace

void moe_sort(ptr expert_ids, ptr offsets, ptr row_map, std::int64_t slots,
              std::int64_t num_experts, int num_threads) {
  check_arg(slots >= 0, "slots must be >= 0, got " + std::to_string(slots));
  check_arg(num_experts > 0, "num_experts must be > 0, got " + std::to_string(num_experts));
  check_ptr(offsets, "offsets");
  const auto* ids = reinterpret_cast<const std::int64_t*>(expert_ids);
  auto* off = reinterpret_cast<std::int64_t*>(offsets);
  auto* rm = reinterpret_cast<std::int64_t*>(row_map);
  if (slots > 0) { check_ptr(expert_ids, "expert_ids"); check_ptr(row_map, "row_map"); }
  // One serial pass: slots = tokens * top_k is small next to the rows it orders (a row is
  // H elements), and a serial counting sort is stable for free.
  std::vector<std::int64_t> cursor(static_cast<std::size_t>(num_experts) + 1, 0);
  for (std::int64_t s = 0; s < slots; ++s) {
    const std::int64_t e = ids[s];
    check_arg(e >= 0 && e < num_experts, "expert_ids[" + std::to_string(s) + "] = " +
              std::to_string(e) + " is outside [0, num_experts=" + std::to_string(num_experts) + ")");
    ++cursor[e + 1];
  }
  for (std::int64_t e = 0; e < num_experts; ++e) cursor[e + 1] += cursor[e];
  for (std::int64_t e = 0; e <= num_experts; ++e) off[e] = cursor[e];
  for (std::int64_t s = 0; s < slots; ++s) rm[s] = cursor[ids[s]]++;
}

void moe_permute(ptr src, std::int64_t src_stride, ptr row_map, ptr scale, ptr dst,
                 std::int64_t tokens, std::int64_t top_k, std::int64_t rows, std::int64_t cols,
                 int dtype, int num_threads) {
  check_arg(tokens >= 0 && top_k > 0 && cols > 0, "moe_permute: bad sizes tokens=" +
            std::to_string(tokens) + " top_k=" + std::to_string(top_k) + " cols=" + std::to_string(cols));
  check_arg(rows == tokens * top_k, "moe_permute: rows must equal tokens * top_k");
  if (tokens == 0) return;
  check_ptr(src, "src"); check_ptr(row_map, "row_map"); check_ptr(dst, "dst");
  const auto* rm = reinterpret_cast<const std::int64_t*>(row_map);
  check_row_map(rm, rows, rows);
  const float* sc = reinterpret_cast<const float*>(scale);
  dispatch_dtype(dtype, "src", [&](auto t) {
    using T = typename decltype(t)::type;
    const T* sp = reinterpret_cast<const T*>(src);
    T* dp = reinterpret_cast<T*>(dst);
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t tok = 0; tok < tokens; ++tok) {
      const T* in = sp + tok * src_stride;
      for (std::int64_t k = 0; k < top_k; ++k) {
        const std::int64_t s = tok * top_k + k;
        T* out = dp + rm[s] * cols;
        if (sc == nullptr) {
          for (std::int64_t c = 0; c < cols; ++c) out[c] = in[c];
        } else {
          const float w = round_to<T>(sc[s]);
#pragma omp simd
          for (std::int64_t c = 0; c < cols; ++c) out[c] = from_float<T>(to_float(in[c]) * w);
        }
      }
    }
  });
}

void moe_unpermute(ptr src, ptr row_map, ptr weights, ptr dst, std::int64_t tokens,
                   std::int64_t top_k, std::int64_t rows, std::int64_t cols, int dtype,
                   int num_threads) {
  check_arg(tokens >= 0 && top_k > 0 && cols > 0, "moe_unpermute: bad sizes tokens=" +
            std::to_string(tokens) + " top_k=" + std::to_string(top_k) + " cols=" + std::to_string(cols));
  check_arg(rows >= 0, "moe_unpermute: rows must be >= 0");
  if (tokens == 0) return;
  check_ptr(src, "src"); check_ptr(row_map, "row_map"); check_ptr(dst, "dst");
  const auto* rm = reinterpret_cast<const std::int64_t*>(row_map);
  check_row_map(rm, tokens * top_k, rows);
  const float* wp = reinterpret_cast<const float*>(weights);
  dispatch_dtype(dtype, "src", [&](auto t) {
    using T = typename decltype(t)::type;
    const T* sp = reinterpret_cast<const T*>(src);
    T* dp = reinterpret_cast<T*>(dst);
#pragma omp parallel num_threads(clamp_threads(num_threads))
    {
      std::vector<float> acc(static_cast<std::size_t>(cols));
#pragma omp for schedule(static)
      for (std::int64_t tok = 0; tok < tokens; ++tok) {
        float* a = acc.data();
        for (std::int64_t c = 0; c < cols; ++c) a[c] = 0.0f;
        for (std::int64_t k = 0; k < top_k; ++k) {
          const std::int64_t s = tok * top_k + k;
          const T* in = sp + rm[s] * cols;
          if (wp == nullptr) {
#pragma omp simd
            for (std::int64_t c = 0; c < cols; ++c) a[c] += to_float(in[c]);
          } else {
            const float w = round_to<T>(wp[s]);
#pragma omp simd
            for (std::int64_t c = 0; c < cols; ++c) a[c] += round_to<T>(to_float(in[c]) * w);
          }
        }
        T* out = dp + tok * cols;
#pragma omp simd
        for (std::int64_t c = 0; c < cols; ++c) out[c] = from_float<T>(a[c]);
      }
    }
  });
}

void moe_unpermute_backward(ptr dy, ptr src, ptr row_map, ptr weights, ptr d_src,
                            ptr d_weights, std::int64_t tokens, std::int64_t top_k,
                            std::int64_t rows, std::int64_t cols, int dtype, int num_threads) {
  check_arg(tokens >= 0 && top_k > 0 && cols > 0, "moe_unpermute_backward: bad sizes");
  check_arg(rows == tokens * top_k, "moe_unpermute_backward: rows must equal tokens * top_k");
  if (tokens == 0) return;
  check_ptr(dy, "dy"); check_ptr(src, "src"); check_ptr(row_map, "row_map");
  check_ptr(weights, "weights"); check_ptr(d_src, "d_src"); check_ptr(d_weights, "d_weights");
  const auto* rm = reinterpret_cast<const std::int64_t*>(row_map);
  check_row_map(rm, rows, rows);
  const float* wp = reinterpret_cast<const float*>(weights);
  float* dwp = reinterpret_cast<float*>(d_weights);
  dispatch_dtype(dtype, "src", [&](auto t) {
    using T = typename decltype(t)::type;
    const T* dyp = reinterpret_cast<const T*>(dy);
    const T* sp = reinterpret_cast<const T*>(src);
    T* dsp = reinterpret_cast<T*>(d_src);
#pragma omp parallel for num_threads(clamp_threads(num_threads)) schedule(static)
    for (std::int64_t tok = 0; tok < tokens; ++tok) {
      const T* g = dyp + tok * cols;
      for (std::int64_t k = 0; k < top_k; ++k) {
        const std::int64_t s = tok * top_k + k;
        const T* in = sp + rm[s] * cols;
        T* out = dsp + rm[s] * cols;
        const float w = round_to<T>(wp[s]);
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (std::int64_t c = 0; c < cols; ++c) {
          const float gv = to_float(g[c]);
          dot += gv * to_float(in[c]);
          out[c] = from_float<T>(gv * w);
        }
        dwp[s] = dot;
      }
    }
  });
}

}  // namespace qwen3_fast::cpu
