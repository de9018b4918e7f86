// Flash-decoding on the GPU over a dense or hierarchical (QuantSpec) KV cache layer.
//
// Grid (B * Hkv, splits), 4 warps per block. A block takes one chunk of one sequence's
// tokens for one kv head, and each warp a quarter of that chunk: every warp is a split of
// its own, writing a partial output and log-sum-exp to a float32 workspace that the merge
// kernel combines (O = sum_s exp(lse_s - lse) O_s). Lanes split head_dim (DPL = D / 32
// consecutive channels each, an even count, so a lane's channels are whole bytes of the
// nibble-packed value codes; key codes are channel-major per group, [D, G/2] with token
// pairs per byte, so a lane reads one byte per key channel: uncoalesced, left for when a
// GPU can measure a tiled key loop). Per token, a lane loads its key channels (codes: U, L and the
// group's per-channel min/scale; or the full-precision ring buffer slot t % ring when
// t >= n_quant), dequantizes them in registers, and the warp reduces q.k for the query rows
// of this kv head (GQA: rows in tiles of kRows, each tile one pass over the chunk); values
// likewise, accumulated per row in registers with an online softmax. Dense caches are the
// buffer-only case (precision 16, ring = T). Verify (n > 1): row i of a head group reads
// keys t <= p = length - n + i, codes for t < nq_i = kv_row_quant_len(p, ...) and the ring
// from there (what one-token decoding of p read); a token in [nq of row 0, n_quant) loads
// both its codes and its ring slot and each row scores the one it reads.
#include "cuda_utils.cuh"
#include "kernels.h"
#include "qwen3_fast/kv_quant_math.h"

namespace qwen3_fast::cuda {

namespace {
constexpr int kWarps = 4;
constexpr int kRows = 8;

template <typename T>
struct FDArgs {
  const T* q;
  const std::uint8_t *ku, *kl, *vu, *vl;
  const T *kmin, *kscale, *vmin, *vscale, *kbuf, *vbuf;
  const std::int32_t *nq, *len;
  float *o_part, *lse_part;
  int Hq, Hkv, n, Tq, ring, G, Gv, chunk, splits;
  float scale;
};

template <typename T, int DPL, int PREC>
__device__ __forceinline__ void load_row(const FDArgs<T>& a, const std::uint8_t* u_arr,
                                         const std::uint8_t* l_arr, const T* buf, bool key,
                                         std::int64_t bh, std::int64_t t, std::int64_t nq,
                                         int lane, float (&out)[DPL]) {
  constexpr int D = DPL * 32;
  const int d0 = lane * DPL;
  if (PREC != 16 && t < nq) {
    if (key) {  // channel-major group [D, G/2]: byte (t % G) / 2 of channel d, nibble t % 2
      const std::int64_t pairs = a.G / 2;
      const std::int64_t base = ((bh * (a.Tq / a.G) + t / a.G) * D + d0) * pairs + (t % a.G) / 2;
      const int sh = static_cast<int>(t % 2) * 4;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int ub = (u_arr[base + i * pairs] >> sh) & 15;
        const int lb = PREC == 8 ? (l_arr[base + i * pairs] >> sh) & 15 : 0;
        out[i] = static_cast<float>(PREC == 8 ? kv_code_from(ub, lb) : 16 * ub);
      }
    } else {  // token-major [Tq, D/2]: channel pairs per byte
      const std::uint8_t* ur = u_arr + (bh * a.Tq + t) * (D / 2) + d0 / 2;
      const std::uint8_t* lr = l_arr + (bh * a.Tq + t) * (D / 2) + d0 / 2;
#pragma unroll
      for (int i = 0; i < DPL / 2; ++i) {
        const int ub = ur[i];
        const int lb = PREC == 8 ? lr[i] : 0;
        const int c0 = PREC == 8 ? kv_code_from(kv_lo(ub), kv_lo(lb)) : 16 * kv_lo(ub);
        const int c1 = PREC == 8 ? kv_code_from(kv_hi(ub), kv_hi(lb)) : 16 * kv_hi(ub);
        out[2 * i] = static_cast<float>(c0);
        out[2 * i + 1] = static_cast<float>(c1);
      }
    }
    if (key) {
      const std::int64_t g = bh * (a.Tq / a.G) + t / a.G;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        out[i] = out[i] * (to_float(a.kscale[g * D + d0 + i]) * 0.0625f) + to_float(a.kmin[g * D + d0 + i]);
      }
    } else {
      const std::int64_t row = (bh * a.Tq + t) * (D / a.Gv);
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int k = (d0 + i) / a.Gv;
        out[i] = out[i] * (to_float(a.vscale[row + k]) * 0.0625f) + to_float(a.vmin[row + k]);
      }
    }
  } else {
    const T* r = buf + (bh * a.ring + t % a.ring) * D + d0;
#pragma unroll
    for (int i = 0; i < DPL; ++i) out[i] = to_float(r[i]);
  }
}

template <typename T, int DPL, int PREC>
__global__ void __launch_bounds__(32 * kWarps) flash_decode_kernel(FDArgs<T> a) {
  constexpr int D = DPL * 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const std::int64_t bh = blockIdx.x, b = bh / a.Hkv, h = bh % a.Hkv;
  const int split = blockIdx.y;
  const int groups = a.Hq / a.Hkv, R = groups * a.n;
  const std::int64_t length = a.len[b];
  const std::int64_t nq = PREC == 16 ? 0 : a.nq[b];
  const std::int64_t c0 = static_cast<std::int64_t>(split) * a.chunk;
  const std::int64_t per_warp = (a.chunk + kWarps - 1) / kWarps;
  const std::int64_t t_begin = c0 + warp * per_warp;
  const std::int64_t t_end = min(min(c0 + a.chunk, t_begin + per_warp), length);
  const std::int64_t part = (bh * a.splits + split) * kWarps + warp;
  const T* q = a.q + (b * a.Hq + h * groups) * a.n * D;
  for (int r0 = 0; r0 < R; r0 += kRows) {
    float qr[kRows][DPL], acc[kRows][DPL], m[kRows], l[kRows];
    std::int64_t limit[kRows], nqr[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = r0 + r;
      m[r] = -1e30f; l[r] = 0.0f;
      limit[r] = row < R ? length - a.n + row % a.n : -1;
      nqr[r] = PREC == 16 || row >= R ? 0 : kv_row_quant_len(limit[r], length, nq, a.G, a.ring);
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        qr[r][i] = row < R ? to_float(q[row * D + lane * DPL + i]) * a.scale : 0.0f;
        acc[r][i] = 0.0f;
      }
    }
    // verify: tokens [nq_first, nq) are codes for some rows and ring values for others
    const std::int64_t nq_first =
        PREC == 16 ? 0 : kv_row_quant_len(length - a.n, length, nq, a.G, a.ring);
    for (std::int64_t t = t_begin; t < t_end; ++t) {
      float kf[DPL], vf[DPL], kb[DPL], vb[DPL];
      load_row<T, DPL, PREC>(a, a.ku, a.kl, a.kbuf, true, bh, t, nq, lane, kf);
      load_row<T, DPL, PREC>(a, a.vu, a.vl, a.vbuf, false, bh, t, nq, lane, vf);
      const bool both = PREC != 16 && t >= nq_first && t < nq;  // warp-uniform
      if (both) {  // n_quant 0: the ring slot
        load_row<T, DPL, PREC>(a, a.ku, a.kl, a.kbuf, true, bh, t, 0, lane, kb);
        load_row<T, DPL, PREC>(a, a.vu, a.vl, a.vbuf, false, bh, t, 0, lane, vb);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool ring_row = both && t >= nqr[r];
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) s += qr[r][i] * (ring_row ? kb[i] : kf[i]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (t <= limit[r]) {
          const float mn = fmaxf(m[r], s);
          const float alpha = __expf(m[r] - mn), p = __expf(s - mn);
          l[r] = l[r] * alpha + p;
#pragma unroll
          for (int i = 0; i < DPL; ++i) acc[r][i] = acc[r][i] * alpha + p * (ring_row ? vb[i] : vf[i]);
          m[r] = mn;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = r0 + r;
      if (row >= R) break;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      float* o = a.o_part + (part * R + row) * D + lane * DPL;
#pragma unroll
      for (int i = 0; i < DPL; ++i) o[i] = acc[r][i] * inv;
      if (lane == 0) a.lse_part[part * R + row] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
    }
  }
}

// One block per (sequence, kv head), threads over rows x channels.
template <typename T>
__global__ void merge_kernel(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                             T* __restrict__ out, int Hq, int Hkv, int n, int D, int parts) {
  const std::int64_t bh = blockIdx.x, b = bh / Hkv, h = bh % Hkv;
  const int groups = Hq / Hkv, R = groups * n;
  T* o = out + (b * Hq + h * groups) * n * D;
  for (int idx = threadIdx.x; idx < R * D; idx += blockDim.x) {
    const int row = idx / D, d = idx % D;
    float mx = -INFINITY;
    for (int p = 0; p < parts; ++p) mx = fmaxf(mx, lse_part[(bh * parts + p) * R + row]);
    float acc = 0.0f, wsum = 0.0f;
    for (int p = 0; p < parts; ++p) {
      const float w = lse_weight(lse_part[(bh * parts + p) * R + row], mx);
      wsum += w;
      acc += w * o_part[((bh * parts + p) * R + row) * D + d];
    }
    o[row * D + d] = from_float<T>(wsum > 0.0f ? acc / wsum : 0.0f);
  }
}

template <typename T, int DPL>
void launch(const FDArgs<T>& a, int precision, std::int64_t bhkv, T* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(bhkv), static_cast<unsigned>(a.splits));
  if (precision == 16) flash_decode_kernel<T, DPL, 16><<<grid, 32 * kWarps, 0, stream>>>(a);
  else if (precision == 8) flash_decode_kernel<T, DPL, 8><<<grid, 32 * kWarps, 0, stream>>>(a);
  else flash_decode_kernel<T, DPL, 4><<<grid, 32 * kWarps, 0, stream>>>(a);
  QWEN3_FAST_CHECK_LAUNCH("flash_decode");
  merge_kernel<T><<<static_cast<unsigned>(bhkv), 256, 0, stream>>>(
      a.o_part, a.lse_part, out, a.Hq, a.Hkv, a.n, DPL * 32, a.splits * kWarps);
  QWEN3_FAST_CHECK_LAUNCH("flash_decode merge");
}
}  // namespace

void flash_decode(ptr q, ptr k_u, ptr k_l, ptr k_min, ptr k_scale, ptr v_u, ptr v_l,
                  ptr v_min, ptr v_scale, ptr k_buf, ptr v_buf, ptr n_quant, ptr lengths,
                  ptr out, ptr o_part, ptr lse_part, std::int64_t batch, std::int64_t heads_q,
                  std::int64_t heads_kv, std::int64_t n_new, std::int64_t head_dim,
                  std::int64_t quant_tokens, std::int64_t ring, std::int64_t group,
                  std::int64_t value_group, std::int64_t chunk, std::int64_t splits,
                  int precision, double scale, int dtype, ptr stream) {
  check_arg(precision == 16 || precision == 8 || precision == 4,
            "flash_decode: precision must be 16, 8 or 4, got " + std::to_string(precision));
  check_arg(head_dim == 64 || head_dim == 128 || head_dim == 256,
            "flash_decode (cuda): head_dim must be 64, 128 or 256, got " + std::to_string(head_dim));
  check_arg(batch >= 0 && heads_kv > 0 && heads_q % heads_kv == 0 && n_new > 0 && ring > 0 &&
                chunk > 0 && splits > 0, "flash_decode: bad sizes");
  if (precision != 16) {
    check_arg(group > 0 && quant_tokens % group == 0 && value_group > 0 &&
                  head_dim % value_group == 0, "flash_decode: bad group sizes");
  }
  if (batch == 0) return;
  check_ptr(q, "q"); check_ptr(k_buf, "k_buf"); check_ptr(v_buf, "v_buf");
  check_ptr(lengths, "lengths"); check_ptr(out, "out"); check_ptr(o_part, "o_part");
  check_ptr(lse_part, "lse_part");
  dispatch_dtype(dtype, "q", [&](auto tx) {
    using T = typename decltype(tx)::type;
    FDArgs<T> a{reinterpret_cast<const T*>(q),
                reinterpret_cast<const std::uint8_t*>(k_u), reinterpret_cast<const std::uint8_t*>(k_l),
                reinterpret_cast<const std::uint8_t*>(v_u), reinterpret_cast<const std::uint8_t*>(v_l),
                reinterpret_cast<const T*>(k_min), reinterpret_cast<const T*>(k_scale),
                reinterpret_cast<const T*>(v_min), reinterpret_cast<const T*>(v_scale),
                reinterpret_cast<const T*>(k_buf), reinterpret_cast<const T*>(v_buf),
                reinterpret_cast<const std::int32_t*>(n_quant),
                reinterpret_cast<const std::int32_t*>(lengths),
                reinterpret_cast<float*>(o_part), reinterpret_cast<float*>(lse_part),
                static_cast<int>(heads_q), static_cast<int>(heads_kv), static_cast<int>(n_new),
                static_cast<int>(quant_tokens), static_cast<int>(ring),
                static_cast<int>(precision == 16 ? 1 : group),
                static_cast<int>(precision == 16 ? head_dim : value_group),
                static_cast<int>(chunk), static_cast<int>(splits), static_cast<float>(scale)};
    T* op = reinterpret_cast<T*>(out);
    const std::int64_t bhkv = batch * heads_kv;
    if (head_dim == 64) launch<T, 2>(a, precision, bhkv, op, as_stream(stream));
    else if (head_dim == 128) launch<T, 4>(a, precision, bhkv, op, as_stream(stream));
    else launch<T, 8>(a, precision, bhkv, op, as_stream(stream));
  });
}

}  // namespace qwen3_fast::cuda
