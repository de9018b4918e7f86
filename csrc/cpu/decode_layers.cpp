// One decode step (n_new new tokens per sequence: 1, or gamma + 1 for a speculative verify)
// through every decoder layer of a dense bfloat16 Qwen3 model over a bfloat16 KV cache, dense
// or hierarchical (read at 8 or 4 bits; a step in which no group leaves the full-precision
// ring), in one call from Python.
//
// Why: a decode step of Qwen3-0.6B at batch 1 makes ~14 kernel calls per layer, 400 in all,
// and each costs ~35 us of Python around a kernel that runs for microseconds (checks, backend
// choice, tensor allocation, argument marshalling): ~15 ms of a ~70 ms step that is
// otherwise bound by reading the weights. This loop calls the same kernels (rms_norm,
// add_rms_norm, linear, qk_norm_rope, flash_decode, silu_and_mul), in the same order, on the
// same inputs, with the same thread counts as the eager path in qwen3_fast/model/layers.py,
// so its output is bitwise the eager step's (python_tests/generate/test_cpu_step.py checks
// that); it changes no arithmetic, only where the loop runs. The Python side
// (qwen3_fast/generate/cpu_step.py) decides when it applies and falls back to the eager
// model otherwise (MoE layers, quantized caches, hooks, autograd, other dtypes, ...).
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu_math.h"
#include "kernels.h"

namespace qwen3_fast::cpu {

namespace {
constexpr int kBF16 = 2;  // dtype code (common.h DType)
// Weight pointers per layer, in the order of decode_layers_bf16's `weights` table.
enum Slot { kInNorm, kQ, kK, kV, kQNorm, kKNorm, kO, kPostNorm, kGate, kUp, kDown, kSlots };
// Cache pointers per layer, in the order of the `cache` table (quantized ones 0 for a dense
// cache, whose buffers are the whole cache: ring = capacity).
enum CacheSlot { kKBuf, kVBuf, kKU, kKL, kKMin, kKScale, kVU, kVL, kVMin, kVScale, kCacheSlots };
}  // namespace

void decode_layers_bf16(ptr x, ptr weights, ptr cache, ptr n_quant, ptr lengths, ptr cos,
                        ptr sin, ptr final_norm, ptr out, std::int64_t batch, std::int64_t n_new,
                        std::int64_t layers, std::int64_t hidden, std::int64_t heads_q,
                        std::int64_t heads_kv, std::int64_t head_dim, std::int64_t inter,
                        std::int64_t ring, std::int64_t quant_tokens, std::int64_t group,
                        std::int64_t value_group, int precision, std::int64_t max_pos,
                        double eps, double scale, int threads, int small_threads,
                        std::int64_t uncapped_stream_bytes) {
  check_arg(batch > 0 && n_new > 0 && batch * n_new <= 16,
            "decode_layers: batch * n_new must be in [1, 16] (the skinny linear kernel's rows), "
            "got batch " + std::to_string(batch) + ", n_new " + std::to_string(n_new));
  check_arg(layers > 0 && hidden > 0 && heads_kv > 0 && heads_q % heads_kv == 0 &&
                head_dim > 0 && head_dim % 2 == 0 && inter > 0 && ring >= n_new && max_pos > 0,
            "decode_layers: bad sizes");
  check_arg(precision == 16 || precision == 8 || precision == 4,
            "decode_layers: precision must be 16, 8 or 4, got " + std::to_string(precision));
  check_ptr(x, "x"); check_ptr(weights, "weights"); check_ptr(cache, "cache");
  check_ptr(lengths, "lengths"); check_ptr(cos, "cos");
  check_ptr(sin, "sin"); check_ptr(final_norm, "final_norm"); check_ptr(out, "out");
  const std::int64_t rows = batch * n_new;  // token rows, sequence-major
  const auto* len = reinterpret_cast<const std::int32_t*>(lengths);
  std::vector<std::int64_t> pos(rows);  // row b * n_new + i sits at length - n_new + i
  std::int64_t kv_tokens = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    check_arg(len[b] >= n_new && len[b] <= max_pos && (precision != 16 || len[b] <= ring),
              "decode_layers: sequence " + std::to_string(b) + " has length " +
                  std::to_string(len[b]) + "; expected n_new..min(cache capacity, rope positions)");
    for (std::int64_t i = 0; i < n_new; ++i) pos[b * n_new + i] = len[b] - n_new + i;
    kv_tokens += len[b];
  }
  const auto* table = reinterpret_cast<const std::int64_t*>(weights);
  const std::int64_t qd = heads_q * head_dim, kvd = heads_kv * head_dim;
  // The eager path's thread rule (ops/_kernel_args.launch): a kernel that streams at least
  // uncapped_stream_bytes gets `threads`, any other `small_threads` (the engine's cap).
  auto team = [&](std::int64_t stream_bytes) {
    return stream_bytes >= uncapped_stream_bytes ? threads : small_threads;
  };
  // keys + values read by the attention (ops/flash_decode.py's stream_bytes)
  const int attn_threads = team(kv_tokens * 2 * kvd * precision / 8);
  auto linear = [&](const bf16* in, std::int64_t w, bf16* y, std::int64_t n, std::int64_t k) {
    linear_bf16(reinterpret_cast<ptr>(in), static_cast<ptr>(w), reinterpret_cast<ptr>(y), rows,
                n, k, team(n * k * 2));
  };
  // Scratch, bf16 as uint16. resid ping-pongs: add_rms_norm writes the new residual apart
  // from the one it reads, as the eager op does. q_t / attn_t: flash_decode's [B, Hq, n, D]
  // layout of the [B, n, Hq, D] rows (the eager transposes; only for n_new > 1).
  std::vector<bf16> h(rows * hidden), res_a(rows * hidden), res_b(rows * hidden),
      mlp_out(rows * hidden), q(rows * qd), k(rows * kvd), v(rows * kvd), attn(rows * qd),
      q_t(n_new > 1 ? rows * qd : 0), attn_t(n_new > 1 ? rows * qd : 0),
      gate_up(rows * 2 * inter), act(rows * inter), gate(rows > 1 ? rows * inter : 0),
      up(rows > 1 ? rows * inter : 0);
  std::vector<float> rstd(rows);
  bf16* residual = res_a.data();
  bf16* spare = res_b.data();
  const auto* cache_table = reinterpret_cast<const std::int64_t*>(cache);
  const bf16* layer_in = reinterpret_cast<const bf16*>(x);  // embeddings, then MLP outputs
  // [B, n, H, D] <-> [B, H, n, D]
  auto swap_mid = [&](const bf16* src, bf16* dst, std::int64_t a_dim, std::int64_t b_dim) {
    for (std::int64_t s = 0; s < batch; ++s)
      for (std::int64_t i = 0; i < a_dim; ++i)
        for (std::int64_t j = 0; j < b_dim; ++j)
          std::memcpy(dst + ((s * b_dim + j) * a_dim + i) * head_dim,
                      src + ((s * a_dim + i) * b_dim + j) * head_dim, sizeof(bf16) * head_dim);
  };

  for (std::int64_t l = 0; l < layers; ++l) {
    const std::int64_t* w = table + l * kSlots;
    if (l == 0) {  // residual = embeddings; h = rms_norm(embeddings)
      std::memcpy(residual, layer_in, sizeof(bf16) * rows * hidden);
      rms_norm_forward(reinterpret_cast<ptr>(layer_in), hidden, static_cast<ptr>(w[kInNorm]),
                       reinterpret_cast<ptr>(h.data()), reinterpret_cast<ptr>(rstd.data()),
                       rows, hidden, eps, kBF16, kBF16, team(0));
    } else {
      add_rms_norm_forward(reinterpret_cast<ptr>(layer_in), hidden, reinterpret_cast<ptr>(residual),
                           hidden, static_cast<ptr>(w[kInNorm]), reinterpret_cast<ptr>(h.data()),
                           reinterpret_cast<ptr>(spare), reinterpret_cast<ptr>(rstd.data()), rows,
                           hidden, eps, kBF16, kBF16, team(0));
      std::swap(residual, spare);
    }
    // attention: projections, QK-norm + RoPE in place, cache write, flash-decode, o_proj
    linear(h.data(), w[kQ], q.data(), qd, hidden);
    linear(h.data(), w[kK], k.data(), kvd, hidden);
    linear(h.data(), w[kV], v.data(), kvd, hidden);
    const auto qp = reinterpret_cast<ptr>(q.data()), kp = reinterpret_cast<ptr>(k.data());
    qk_norm_rope_forward(qp, qd, head_dim, kp, kvd, head_dim, static_cast<ptr>(w[kQNorm]),
                         static_cast<ptr>(w[kKNorm]), cos, sin, reinterpret_cast<ptr>(pos.data()),
                         true, qp, qd, head_dim, kp, kvd, head_dim, 0, 0, rows, heads_q,
                         heads_kv, head_dim, max_pos, eps, kBF16, kBF16, team(0));
    const std::int64_t* c = cache_table + l * kCacheSlots;
    auto* kl = reinterpret_cast<bf16*>(c[kKBuf]);
    auto* vl = reinterpret_cast<bf16*>(c[kVBuf]);
    for (std::int64_t r = 0; r < rows; ++r) {  // the new tokens' slots (such a step only
      const std::int64_t b = r / n_new;        // writes the ring: no group leaves it)
      for (std::int64_t hh = 0; hh < heads_kv; ++hh) {
        const std::int64_t dst = ((b * heads_kv + hh) * ring + pos[r] % ring) * head_dim;
        const std::int64_t src = r * kvd + hh * head_dim;
        std::memcpy(kl + dst, k.data() + src, sizeof(bf16) * head_dim);
        std::memcpy(vl + dst, v.data() + src, sizeof(bf16) * head_dim);
      }
    }
    bf16* q_in = q.data();
    bf16* o_out = attn.data();
    if (n_new > 1) {
      swap_mid(q.data(), q_t.data(), n_new, heads_q);
      q_in = q_t.data();
      o_out = attn_t.data();
    }
    flash_decode(reinterpret_cast<ptr>(q_in), c[kKU], c[kKL], c[kKMin], c[kKScale], c[kVU],
                 c[kVL], c[kVMin], c[kVScale], reinterpret_cast<ptr>(kl),
                 reinterpret_cast<ptr>(vl), n_quant, lengths, reinterpret_cast<ptr>(o_out), batch,
                 heads_q, heads_kv, n_new, head_dim, quant_tokens, ring, group, value_group,
                 precision, scale, kBF16, attn_threads);
    if (n_new > 1) swap_mid(attn_t.data(), attn.data(), heads_q, n_new);
    linear(attn.data(), w[kO], mlp_out.data(), hidden, qd);
    add_rms_norm_forward(reinterpret_cast<ptr>(mlp_out.data()), hidden,
                         reinterpret_cast<ptr>(residual), hidden, static_cast<ptr>(w[kPostNorm]),
                         reinterpret_cast<ptr>(h.data()), reinterpret_cast<ptr>(spare),
                         reinterpret_cast<ptr>(rstd.data()), rows, hidden, eps, kBF16, kBF16,
                         team(0));
    std::swap(residual, spare);
    // SwiGLU MLP: [gate | up] rows as the eager torch.cat builds them, then down
    if (rows == 1) {
      linear(h.data(), w[kGate], gate_up.data(), inter, hidden);
      linear(h.data(), w[kUp], gate_up.data() + inter, inter, hidden);
    } else {
      linear(h.data(), w[kGate], gate.data(), inter, hidden);
      linear(h.data(), w[kUp], up.data(), inter, hidden);
      for (std::int64_t r = 0; r < rows; ++r) {
        std::memcpy(gate_up.data() + r * 2 * inter, gate.data() + r * inter, sizeof(bf16) * inter);
        std::memcpy(gate_up.data() + r * 2 * inter + inter, up.data() + r * inter,
                    sizeof(bf16) * inter);
      }
    }
    silu_and_mul_forward(reinterpret_cast<ptr>(gate_up.data()), 2 * inter,
                         reinterpret_cast<ptr>(act.data()), rows, inter, kBF16, team(0));
    linear(act.data(), w[kDown], mlp_out.data(), hidden, inter);
    layer_in = mlp_out.data();
  }
  add_rms_norm_forward(reinterpret_cast<ptr>(layer_in), hidden, reinterpret_cast<ptr>(residual),
                       hidden, final_norm, out, reinterpret_cast<ptr>(spare),
                       reinterpret_cast<ptr>(rstd.data()), rows, hidden, eps, kBF16, kBF16,
                       team(0));
}

}  // namespace qwen3_fast::cpu
