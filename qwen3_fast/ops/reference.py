"""Plain-PyTorch version of every op: the oracle of every test and the fallback path.

Written for clarity, with the exact Hugging Face Qwen3 rounding order (fp32 math, cast to
the input dtype, then the weight multiply in the weight's dtype). Autograd comes from
torch, so gradcheck runs on these in float64. Shapes: T tokens (any leading dims), H
hidden, I intermediate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Qwen3RMSNorm. x: [..., H], weight: [H] -> [..., H] in promote(x, weight)."""
    x32 = x.to(torch.float32) if x.dtype != torch.float64 else x
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = x32 * torch.rsqrt(variance + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add in the model dtype, then RMSNorm: returns (y, new_residual)."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate_up [..., 2I] (gate first) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------
# RoPE, attention and MoE (issue 3). Shapes: B batch, S sequence, T tokens, Hq/Hkv heads,
# D head_dim, E experts, K top-k, I expert intermediate size.


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default",
                  factor: float = 1.0, original_max_position_embeddings: int | None = None,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
                  attention_factor: float | None = None) -> tuple[torch.Tensor, float]:
    """HF inverse frequencies [D/2] (fp32) and the cos/sin multiplier, default or YaRN."""
    import math

    dim = head_dim
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} is not supported; expected 'default' or 'yarn'")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_interp = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interp * (1 - extrapolation_factor) + inv_freq * extrapolation_factor
    return inv_freq, float(attention_factor)


def rope_cos_sin(inv_freq: torch.Tensor, attention_factor: float,
                 max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, D] fp32 = cat(freqs, freqs).{cos,sin}() * attention_factor."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.to(torch.float32)[None, :]  # one product each, as HF
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm over D, then half-split rotation at `positions`.

    q: [..., Hq, D], k: [..., Hkv, D], positions: [...] (the leading dims of q),
    cos/sin: [P, D] fp32 tables, gathered then cast to the normed dtype like HF.
    """
    return rope_rotate(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin,
                       positions)


def rope_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF apply_rotary_pos_emb on [..., H, D] tensors with cos/sin gathered at positions [...]."""
    c = cos[positions].to(q.dtype).unsqueeze(-2)  # [..., 1, D]
    s = sin[positions].to(q.dtype).unsqueeze(-2)
    ck, sk = c.to(k.dtype), s.to(k.dtype)
    return q * c + rotate_half(q) * s, k * ck + rotate_half(k) * sk


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              attention_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Softmax attention as HF's sdpa path: q [B, Hq, S, D], k/v [B, Hkv, S_kv, D] -> [B, Hq, S, D].

    attention_mask: [B, S_kv] keep-mask (nonzero = attend) combined with the causal mask,
    the queries being the last S positions of the S_kv keys. Rows with no key allowed give 0.
    """
    import torch.nn.functional as F

    s_q, s_kv = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, S_kv]
    if causal and (mask is not None or s_q != s_kv):
        allowed = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device).tril(s_kv - s_q)
        mask = allowed if mask is None else mask & allowed
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and s_q > 1, scale=scale,
                                              enable_gqa=groups > 1)
    if groups > 1:  # HF repeats kv heads when a mask is given (SDPA's GQA path is mask-free)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def moe_route(router_logits: torch.Tensor, top_k: int,
              norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] fp32, expert_ids [T, K] int64, probs [T, E] fp32)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids, probs


def moe_experts(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """Routed SwiGLU experts, HF's loop: x [T, H], w_gate_up [E, 2I, H] (gate rows first),
    w_down [E, H, I] -> y [T, H] in x's dtype (weights cast to x's dtype before the multiply)."""
    weights, expert_ids, _ = moe_route(router_logits, top_k, norm_topk_prob)
    weights = weights.to(x.dtype)
    num_experts = w_gate_up.shape[0]
    y = torch.zeros_like(x)
    # expert_mask: [E, K, T]
    expert_mask = F.one_hot(expert_ids, num_classes=num_experts).permute(2, 1, 0)
    for e in torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
        slot, tok = torch.where(expert_mask[e])
        gate_up = x[tok] @ w_gate_up[e].t()  # [n, 2I]
        h = silu_and_mul(gate_up) @ w_down[e].t()  # [n, H]
        y = y.index_add(0, tok, (h * weights[tok, slot, None]).to(x.dtype))
    return y


def load_balancing_loss(router_logits_per_layer, num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF ``load_balancing_loss_func``: E * sum_e f_e * P_e over all layers' [B*S, E] logits,
    padding (attention_mask [B, S] == 0) excluded from both f and P."""
    logits = torch.cat([t.to(router_logits_per_layer[0].device) for t in router_logits_per_layer])
    probs = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    expert_mask = F.one_hot(selected, num_experts)  # [N, K, E]
    if attention_mask is None:
        tokens_per_expert = expert_mask.float().mean(dim=0)
        prob_per_expert = probs.mean(dim=0)
    else:
        b, s = attention_mask.shape
        layers = logits.shape[0] // (b * s)
        m = attention_mask.to(logits.device)
        m_k = m[None, :, :, None, None].expand(layers, b, s, top_k, num_experts).reshape(
            -1, top_k, num_experts)
        tokens_per_expert = (expert_mask.float() * m_k).sum(dim=0) / m_k.sum(dim=0)
        m_e = m[None, :, :, None].expand(layers, b, s, num_experts).reshape(-1, num_experts)
        prob_per_expert = (probs * m_e).sum(dim=0) / m_e.sum(dim=0)
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * num_experts


# ---------------------------------------------------------------- hierarchical KV (QuantSpec)
# Format: DESIGN.md "KV caches" and csrc/include/qwen3_fast/kv_quant_math.h.
def kv_group_stats(x: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """min and scale (max - min) / 15 over `dim` (kept), stored in `dtype`; the scale is
    rounded up to `dtype` so that 15 * scale covers the group's range."""
    xf = x.to(torch.float32)
    mn32 = xf.amin(dim, keepdim=True)
    rng = xf.amax(dim, keepdim=True) - mn32
    # IEEE division by a tensor: torch's CUDA division by a Python scalar multiplies by the
    # rounded reciprocal instead (1 ulp off in float32), which the kernels do not do
    s = (rng / torch.full_like(rng, 15.0)).to(dtype)
    s = torch.where(s.to(torch.float32) * 15.0 < rng, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return mn32.to(dtype), s


def kv_codes(x: torch.Tensor, mn: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact 8-bit codes in [0, 240] (int32), broadcasting min/scale; 0 where s == 0."""
    step = s.to(torch.float32) * 0.0625
    y = (x.to(torch.float32) - mn.to(torch.float32)) / torch.where(step > 0, step, torch.ones_like(step))
    y = torch.where(step > 0, y, torch.zeros_like(y))
    return torch.floor(y + 0.5).clamp(0, 240).to(torch.int32)


def kv_pack_nibbles(n: torch.Tensor) -> torch.Tensor:
    """[..., C] ints in 0..15 -> [..., C/2] uint8 (element 2i low nibble, 2i+1 high)."""
    n = n.to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def kv_unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """[..., C/2] uint8 -> [..., C] int32."""
    lo, hi = (p & 15).to(torch.int32), (p >> 4).to(torch.int32)
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def kv_quantize(x: torch.Tensor, kind: str, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """QuantSpec quantization of keys or values (x in the model dtype).

    kind "key":   x [..., T, D], T % G == 0: per channel over groups of G tokens ->
                  U, L [..., T/G, D, G/2] uint8 (channel-major inside a group, nibbles
                  packed along tokens: token 2j low, 2j+1 high); min, scale [..., T/G, D]
    kind "value": x [..., D], D % G == 0: per token over groups of G along D ->
                  U, L [..., D/2] uint8; min, scale [..., D/G]
    """
    if kind == "key":
        *lead, t, d = x.shape
        g = x.reshape(*lead, t // group_size, group_size, d)
        mn, s = kv_group_stats(g, -2, x.dtype)  # [..., T/G, 1, D]
        c = kv_codes(g, mn, s).transpose(-1, -2).contiguous()  # [..., T/G, D, G]
        mn, s = mn.squeeze(-2), s.squeeze(-2)
    else:
        *lead, d = x.shape
        g = x.reshape(*lead, d // group_size, group_size)
        mn, s = kv_group_stats(g, -1, x.dtype)  # [..., D/G, 1]
        c = kv_codes(g, mn, s).reshape(*lead, d)
        mn, s = mn.squeeze(-1), s.squeeze(-1)
    u = (c + 8) >> 4
    lo = c - 16 * u + 8
    return kv_pack_nibbles(u), kv_pack_nibbles(lo), mn, s


def kv_dequantize(u: torch.Tensor, lo: torch.Tensor | None, mn: torch.Tensor, s: torch.Tensor,
                  kind: str, group_size: int, bits: int = 8) -> torch.Tensor:
    """Inverse of :func:`kv_quantize` in float32: bits 8 reads U and L, bits 4 only U.
    Keys: U, L [..., T/G, D, G/2] -> [..., T, D]; values: U, L [..., D/2] -> [..., D]."""
    uc = kv_unpack_nibbles(u)
    c = 16 * uc if bits == 4 else 16 * uc + kv_unpack_nibbles(lo) - 8
    step = s.to(torch.float32) * 0.0625
    mnf = mn.to(torch.float32)
    if kind == "key":  # c [..., T/G, D, G]
        *lead, ng, d, g = c.shape
        cg = c.transpose(-1, -2).to(torch.float32)  # [..., T/G, G, D]
        return (cg * step.unsqueeze(-2) + mnf.unsqueeze(-2)).reshape(*lead, ng * g, d)
    *lead, d = c.shape
    cg = c.reshape(*lead, d // group_size, group_size).to(torch.float32)
    return (cg * step.unsqueeze(-1) + mnf.unsqueeze(-1)).reshape(*lead, d)


def kv_row_quant_lengths(lengths: torch.Tensor, n_quant: torch.Tensor, n: int,
                         group_size: int, ring: int) -> torch.Tensor:
    """Per query row, the quantized prefix it reads in a hierarchical cache: [B, n] int64.

    Row i of sequence b sits at p = lengths[b] - n + i and reads codes for [0, nq_i), the
    full-precision ring for [nq_i, p]: nq_i = min(n_quant[b], max(quantized_length(p + 1, G),
    the ring's oldest whole group G * ceil((lengths[b] - ring) / G))). With the cache's
    n_quant = quantized_length(length), row n - 1 reads n_quant (n = 1: plain decoding) and
    every row reads what decoding one token at a time reached it with: that needs
    n <= S + 1 (ring = 2G + S); for longer steps the ring bound lifts the early rows' prefix
    to the groups whose full-precision values are still in the ring (module docstring of
    qwen3_fast/cache/hierarchical.py). csrc/include/qwen3_fast/kv_quant_math.h has the same
    function for the C++/CUDA kernels."""
    g = group_size
    length = lengths.to(torch.int64).view(-1, 1)
    p = length - n + torch.arange(n, device=lengths.device).view(1, n)
    policy = g * torch.clamp(torch.div(p - g, g, rounding_mode="floor"), min=0)
    floor = g * torch.div(torch.clamp(length - ring, min=0) + g - 1, g, rounding_mode="floor")
    return torch.minimum(n_quant.to(torch.int64).view(-1, 1), torch.maximum(policy, floor))


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                 scale: float, k_full: torch.Tensor | None = None,
                 v_full: torch.Tensor | None = None,
                 row_quant: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a cache, fp32 math: q [B, Hq, n, D] are the newest n tokens of
    each sequence (already in the cache), k/v [B, Hkv, T, D] (any float dtype, the logical
    token order), lengths [B] valid tokens. Query i of sequence b sits at position
    lengths[b] - n + i and reads keys 0..that position. -> [B, Hq, n, D] in q's dtype.

    Hierarchical caches (verify variant): with k_full, v_full [B, Hkv, T, D] (the
    full-precision view) and row_quant [B, n] (:func:`kv_row_quant_lengths`), query i reads
    k, v (the dequantized codes) at t < row_quant[b, i] and k_full, v_full from there on."""
    b, hq, n, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    groups = hq // hkv
    qf = q.to(torch.float32).reshape(b, hkv, groups * n, d)
    kf, vf = k.to(torch.float32), v.to(torch.float32)
    scores = torch.einsum("bhrd,bhtd->bhrt", qf, kf) * scale  # [B, Hkv, G*n, T]
    tok = torch.arange(t, device=q.device).view(1, 1, t)
    pos = lengths.to(torch.int64).view(b, 1) - n + torch.arange(n, device=q.device).view(1, n)
    allowed = tok <= pos.view(b, n, 1)  # [B, n, T]
    allowed = allowed.unsqueeze(1).expand(b, groups, n, t).reshape(b, 1, groups * n, t)
    use_q = None
    if row_quant is not None:
        use_q = (tok < row_quant.to(q.device).view(b, n, 1)).unsqueeze(1)
        use_q = use_q.expand(b, groups, n, t).reshape(b, 1, groups * n, t)
        full = torch.einsum("bhrd,bhtd->bhrt", qf, k_full.to(torch.float32)) * scale
        scores = torch.where(use_q, scores, full)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if use_q is None:
        o = torch.einsum("bhrt,bhtd->bhrd", p, vf)
    else:
        o = (torch.einsum("bhrt,bhtd->bhrd", p * use_q, vf)
             + torch.einsum("bhrt,bhtd->bhrd", p * ~use_q, v_full.to(torch.float32)))
    return o.reshape(b, hq, n, d).to(q.dtype)


# ---------------------------------------------------------------------------------------
# Fused LM head + cross-entropy (issue 9). T tokens, H hidden, V vocab.


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The unfused oracle: logits = hidden @ weight.T in the input dtype (HF's lm_head),
    then fp32 cross-entropy. hidden [T, H], weight [V, H], labels [T] -> scalar fp32."""
    logits = hidden @ weight.t()  # [T, V]
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                           reduction=reduction)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0,
                    ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused oracle of ops.linear_logprobs (issue 10): logits = hidden @ weight.T in
    the input dtype, then fp32 (fp64 for fp64 inputs) / temperature, log_softmax.
    hidden [T, H], weight [V, H], targets [T] -> (logprobs [T], entropy [T]): the target's
    log-probability and the distribution's entropy; 0 (and no gradient) where
    targets == ignore_index."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax((hidden @ weight.t()).to(acc) / temperature, dim=-1)  # [T, V]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def linear_jsd(student_hidden: torch.Tensor, student_weight: torch.Tensor,
               teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
               labels: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
               ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The unfused oracle of ops.linear_jsd (issue 10): full student and teacher logits
    (each ``hidden @ weight.T`` in its input dtype, then fp32 (fp64 for an fp64 student)
    / temperature), then the generalized JSD per token: M = (1-beta) P_S + beta P_T,
    beta KL(P_T||M) + (1-beta) KL(P_S||M); beta = 0 is KL(P_T||P_S), beta = 1 is
    KL(P_S||P_T). The teacher is a constant (detached). student_hidden [T, Hs],
    student_weight [V, Hs], teacher_hidden [T, Ht], teacher_weight [V, Ht], labels [T]
    (only masks) -> [T] ("none", 0 on masked rows) or a scalar ("sum", "mean" over unmasked)."""
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    log_ps = torch.log_softmax((student_hidden @ student_weight.t()).to(acc) / temperature, -1)
    with torch.no_grad():
        log_pt = torch.log_softmax((teacher_hidden @ teacher_weight.t()).to(acc) / temperature,
                                   -1)
    if beta == 0.0:  # kl_div(input, target) = KL(target || input)
        rows = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        rows = F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
        rows = (beta * F.kl_div(log_m, log_pt, reduction="none", log_target=True).sum(-1)
                + (1 - beta) * F.kl_div(log_m, log_ps, reduction="none", log_target=True).sum(-1))
    valid = labels != ignore_index
    rows = torch.where(valid, rows, torch.zeros((), dtype=acc, device=rows.device))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


# ---------------------------------------------------------------------------------------
# MoE permutation and grouped GEMM (issue 5). A slot s = t * K + k is token t's k-th expert
# choice; row_map[s] is its row in the expert-sorted buffer; offsets [E+1] bound each
# expert's rows.


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], expert_ids [T, K] -> (x_sorted [T*K, H], offsets [E+1] int64,
    row_map [T*K] int64), rows grouped by expert, token order within an expert."""
    top_k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # sorted row -> slot
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return x[order // top_k], offsets, row_map


def moe_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine: y[t] = sum_k y_sorted[row_map[t*K+k]] * weights[t, k], each product
    rounded to y's dtype as HF does (weights cast to that dtype first), summed in fp32.
    y_sorted [T*K, H], row_map [T*K], weights [T, K] -> y [T, H]."""
    rows = y_sorted[row_map]  # [T*K, H]
    t, k = weights.shape
    prod = rows.view(t, k, rows.shape[1]) * weights.to(y_sorted.dtype).unsqueeze(-1)
    acc = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    return prod.to(acc).sum(1).to(y_sorted.dtype)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
                 trans_b: bool = False) -> torch.Tensor:
    """c[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ (b[e].T if trans_b else b[e]).
    a [M, K], b [E, K, N] ([E, N, K] when trans_b), offsets [E+1] -> c [M, N] (rows outside
    every group are zero)."""
    n = b.shape[1] if trans_b else b.shape[2]
    c = a.new_zeros((a.shape[0], n))
    bounds = offsets.tolist()
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            c[lo:hi] = a[lo:hi] @ (b[e].t() if trans_b else b[e])
    return c


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> [..., N] in x's dtype, computed in float32 (float64 for
    float64 inputs) and rounded once."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) @ weight.to(acc).t()).to(x.dtype)
