"""qk_norm_rope / qk_norm_rope_ / rope_cache: every compiled backend against HF and the reference.

HF here is transformers' own ``Qwen3RMSNorm`` on q and k, then ``apply_rotary_pos_emb``
with cos/sin gathered per token as ``Qwen3RotaryEmbedding`` gives them (cast to the
activation dtype). Forwards are compared with HF run in the same dtype (bf16/fp16: bit-exact
but for rare 1-ulp flips where the fp32 sum of squares, summed in another order, moves
rstd); gradients with HF run in float64 on the same values (the oracle).

    pytest python_tests/ops/test_qk_norm_rope.py   # ~20 s on 2 CPU cores
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import _ext, ops
from qwen3_fast.ops import reference

from conftest import assert_close_to_oracle, compiled_backends

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3.modeling_qwen3 import (  # noqa: E402
    Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb)

EPS = 1e-6
MAX_POS = 131072
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(64, 16, 8), (128, 32, 4), (128, 40, 8)]  # (head_dim, Hq, Hkv)
needs_c = pytest.mark.skipif(not _ext.available(), reason="_C not built")


def _hf_config(head_dim: int, max_pos: int = MAX_POS):
    kw = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
              max_position_embeddings=max_pos)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = {"rope_theta": 1e6, **YARN}
    else:
        kw.update(rope_theta=1e6, rope_scaling=dict(YARN))
    return transformers.Qwen3Config(**kw)


_TABLES: dict = {}


def _tables(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cache tables for Qwen3 with YaRN factor 4 over 131072 positions (built once)."""
    if head_dim not in _TABLES:
        _TABLES[head_dim] = ops.rope_cache(_hf_config(head_dim), MAX_POS)
    return _TABLES[head_dim]


def _hf(q, k, qw, kw, cos, sin, positions):
    """transformers' modules on [..., H, D] tensors (HF runs them on [B, H, S, D])."""
    norm = Qwen3RMSNorm(q.shape[-1], EPS)
    qn = torch.func.functional_call(norm, {"weight": qw}, (q,))
    kn = torch.func.functional_call(norm, {"weight": kw}, (k,))
    lead = q.shape[:-2]
    c = cos[positions.reshape(-1)].to(qn.dtype).reshape(1, -1, q.shape[-1])  # [1, N, D]
    s = sin[positions.reshape(-1)].to(qn.dtype).reshape(1, -1, q.shape[-1])
    qh = qn.reshape(-1, *q.shape[-2:]).transpose(0, 1)[None]  # [1, Hq, N, D]
    kh = kn.reshape(-1, *k.shape[-2:]).transpose(0, 1)[None]
    qo, ko = apply_rotary_pos_emb(qh, kh, c, s)
    return (qo[0].transpose(0, 1).reshape(*lead, *q.shape[-2:]),
            ko[0].transpose(0, 1).reshape(*lead, *k.shape[-2:]))


def _inputs(lead, hq, hkv, d, dtype, w_dtype=None, seed=0, max_pos=MAX_POS):
    g = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(*lead, hq, d, generator=g)).to(dtype)
    k = (torch.randn(*lead, hkv, d, generator=g) + 0.5).to(dtype)
    w_dtype = w_dtype or dtype
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(w_dtype)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(w_dtype)
    pos = torch.randint(0, max_pos, lead, generator=g)
    pos.view(-1)[0] = max_pos - 1  # the last row of the table
    return q, k, qw, kw, pos


def _ulp(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(info.tiny))))


def _assert_hf_exact(actual, expected, dtype, name):
    """Same dtype as HF: fp32 to fp32 precision; bf16/fp16 within 1 ulp, >= 99% bit-equal."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6, msg=name)
        return
    a, e = actual.double(), expected.double()
    # 1 ulp of the output, plus 1 ulp of the largest value: a 1-ulp flip of the normed value
    # goes through a product with cos/sin (|c|, |s| <= 1.14) into a sum that may cancel
    tol = 2 * _ulp(e, dtype) + 2 * torch.finfo(dtype).eps * e.abs().max()
    assert bool(((a - e).abs() <= tol).all()), f"{name}: max |diff| {(a - e).abs().max():.3g}"
    assert (a == e).double().mean() >= 0.99, f"{name}: {(a != e).double().mean():.2%} differ"


# ------------------------------------------------------------------ rope_cache
def test_rope_cache_equals_hf_yarn_to_131072():
    d = 128
    cfg = _hf_config(d)
    rotary = Qwen3RotaryEmbedding(cfg)
    positions = torch.arange(MAX_POS)[None]
    cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = _tables(d)
    assert cos.shape == (MAX_POS, d) and cos.dtype == torch.float32
    assert torch.equal(cos, cos_ref[0]) and torch.equal(sin, sin_ref[0])
    assert abs(cos[0, 0].item() - 1.1386) < 1e-4  # attention factor 0.1 ln 4 + 1


# ------------------------------------------------------------------ forward + gradients vs HF
@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS)
@pytest.mark.parametrize("lead", [(7,), (3, 5)], ids=["T7", "B3S5"])
def test_matches_hf_forward_and_gradients(device, backend, dtype, d, hq, hkv, lead):
    cos, sin = _tables(d)
    q, k, qw, kw, pos = _inputs(lead, hq, hkv, d, dtype, seed=d + hq)
    q, k, qw, kw = (t.to(device).requires_grad_() for t in (q, k, qw, kw))
    cos_d, sin_d, pos_d = cos.to(device), sin.to(device), pos.to(device)
    with ops.use_backend(backend):
        q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos_d, sin_d, pos_d, EPS)
    q_hf, k_hf = _hf(q.detach().cpu(), k.detach().cpu(), qw.detach().cpu(), kw.detach().cpu(),
                     cos, sin, pos)
    _assert_hf_exact(q_out.detach().cpu(), q_hf.detach(), dtype, "q_out")
    _assert_hf_exact(k_out.detach().cpu(), k_hf.detach(), dtype, "k_out")

    g = torch.Generator().manual_seed(1)
    dq_out = torch.randn(q_out.shape, generator=g).to(dtype)
    dk_out = torch.randn(k_out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad((q_out, k_out), (q, k, qw, kw),
                                (dq_out.to(device), dk_out.to(device)))
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, qw, kw)]
    out64 = _hf(*leaves64, cos.double(), sin.double(), pos)
    oracle = torch.autograd.grad(out64, leaves64, (dq_out.double(), dk_out.double()))
    for name, got, want in zip(("dq", "dk", "dq_weight", "dk_weight"), grads, oracle):
        assert got.dtype == dtype, name
        assert_close_to_oracle(got.cpu(), want, dtype, scale=2, name=name)


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weights_promote_like_hf(device, backend, dtype):
    cos, sin = _tables(64)
    q, k, qw, kw, pos = _inputs((9,), 16, 8, 64, dtype, w_dtype=torch.float32, seed=3)
    leaves = [t.to(device).requires_grad_() for t in (q, k, qw, kw)]
    with ops.use_backend(backend):
        q_out, k_out = ops.qk_norm_rope(*leaves, cos.to(device), sin.to(device), pos.to(device),
                                        EPS)
    q_hf, k_hf = _hf(q, k, qw, kw, cos, sin, pos)
    assert q_out.dtype == torch.float32 == q_hf.dtype
    torch.testing.assert_close(q_out.detach().cpu(), q_hf.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(k_out.detach().cpu(), k_hf.detach(), rtol=2e-6, atol=2e-6)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    grads = torch.autograd.grad((q_out, k_out), leaves, (dq_out, dk_out))
    l64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    oracle = torch.autograd.grad(_hf(*l64, cos.double(), sin.double(), pos), l64,
                                 (dq_out.cpu().double(), dk_out.cpu().double()))
    for name, got, want, leaf in zip(("dq", "dk", "dq_weight", "dk_weight"), grads, oracle, leaves):
        assert got.dtype == leaf.dtype, name
        assert_close_to_oracle(got.cpu(), want, dtype, scale=2, name=name)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_reference(dtype):
    cos, sin = _tables(128)
    q, k, qw, kw, pos = _inputs((11,), 32, 4, 128, dtype, seed=5)
    with ops.use_backend("cpu"):
        out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
    ref = reference.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
    for got, want, name in zip(out, ref, ("q", "k")):
        _assert_hf_exact(got, want, dtype, name)


# ------------------------------------------------------------------ layouts and positions
@pytest.mark.parametrize("device,backend", compiled_backends())
def test_packed_positions_and_layouts(device, backend):
    """Three packed sequences of odd lengths restart at 0: equal to separate calls; [B, S]
    equals [T]; a strided slice of a fused qkv projection needs no copy; int32 positions."""
    d, hq, hkv = 64, 4, 2
    cos, sin = (t.to(device) for t in _tables(d))
    qkv = torch.randn(13, (hq + 2 * hkv) * d, device=device, dtype=torch.bfloat16)
    q = qkv[:, : hq * d].view(13, hq, d)  # token stride (hq + 2 hkv) * d
    k = qkv[:, hq * d:(hq + hkv) * d].view(13, hkv, d)
    qw = torch.rand(d, device=device, dtype=torch.bfloat16) + 0.5
    kw = torch.rand(d, device=device, dtype=torch.bfloat16) + 0.5
    lengths = [5, 1, 7]
    pos = torch.cat([torch.arange(n) + 100 * i for i, n in enumerate(lengths)]).to(device)
    with ops.use_backend(backend):
        q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
        q_i32, k_i32 = ops.qk_norm_rope(q, k, qw, kw, cos, sin, pos.int(), EPS)
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            qs, ks = ops.qk_norm_rope(q[sl].contiguous(), k[sl].contiguous(), qw, kw, cos, sin,
                                      pos[sl], EPS)
            assert torch.equal(qs, q_out[sl]) and torch.equal(ks, k_out[sl])
            start += n
        q4, k4 = ops.qk_norm_rope(q[:12].reshape(3, 4, hq, d), k[:12].reshape(3, 4, hkv, d), qw,
                                  kw, cos, sin, pos[:12].reshape(3, 4), EPS)
    assert torch.equal(q_i32, q_out) and torch.equal(k_i32, k_out)
    assert q4.shape == (3, 4, hq, d)
    assert torch.equal(q4.reshape(12, hq, d), q_out[:12])
    assert torch.equal(k4.reshape(12, hkv, d), k_out[:12])
    ref = reference.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
    _assert_hf_exact(q_out.cpu(), ref[0].cpu(), torch.bfloat16, "q")


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_zero_tokens(device, backend):
    cos, sin = (t.to(device) for t in _tables(64))
    q = torch.randn(0, 2, 64, device=device, requires_grad=True)
    k = torch.randn(0, 1, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    with ops.use_backend(backend):
        q_out, k_out = ops.qk_norm_rope(q, k, w, w, cos, sin,
                                        torch.zeros(0, dtype=torch.long, device=device))
        (q_out.sum() + k_out.sum()).backward()
    assert q_out.shape == (0, 2, 64) and torch.equal(w.grad, torch.zeros(64, device=device))


# ------------------------------------------------------------------ in place
@pytest.mark.parametrize("device,backend", compiled_backends() + [
    pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inplace_equals_out_of_place(device, backend, dtype):
    cos, sin = (t.to(device) for t in _tables(128))
    q, k, qw, kw, pos = (t.to(device) for t in _inputs((2, 3), 40, 8, 128, dtype, seed=7))
    with ops.use_backend(backend):
        q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
        q_ptr = q.data_ptr()
        with torch.no_grad():
            q2, k2 = ops.qk_norm_rope_(q, k, qw, kw, cos, sin, pos, EPS)
    assert q2 is q and k2 is k and q.data_ptr() == q_ptr
    assert torch.equal(q, q_out) and torch.equal(k, k_out)


@needs_c
def test_inplace_rejects_autograd_and_promotion():
    cos, sin = _tables(64)
    q, k, qw, kw, pos = _inputs((3,), 2, 1, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="q_weight has dtype torch.float32"):
        ops.qk_norm_rope_(q, k, qw.float(), kw.float(), cos, sin, pos)
    with pytest.raises(RuntimeError, match="inference"):
        ops.qk_norm_rope_(q.requires_grad_(), k, qw, kw, cos, sin, pos)
    qt = torch.randn(2, 3, 2, 64, dtype=torch.bfloat16).transpose(0, 1)  # not viewable as [N,H,D]
    with torch.no_grad(), pytest.raises(ValueError, match="cannot be viewed"):
        ops.qk_norm_rope_(qt, torch.randn(2, 3, 1, 64, dtype=torch.bfloat16).transpose(0, 1),
                          qw, kw, cos, sin, pos[:2].reshape(1, 2).expand(3, 2).contiguous())


# ------------------------------------------------------------------ contract
def test_float64_gradcheck_on_reference_path():
    d = 8
    cos, sin = ops.rope_cache({"head_dim": d, "rope_theta": 1e4}, 16, dtype=torch.float64)
    q = torch.randn(3, 2, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 1, d, dtype=torch.float64, requires_grad=True)
    qw = torch.rand(d, dtype=torch.float64, requires_grad=True)
    kw = torch.rand(d, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([0, 15, 2])
    assert torch.autograd.gradcheck(
        lambda *a: ops.qk_norm_rope(*a, cos, sin, pos, EPS), (q, k, qw, kw))


@needs_c
def test_opcheck_custom_ops():
    cos, sin = ops.rope_cache({"head_dim": 16, "rope_theta": 1e4}, 32)
    q = torch.randn(5, 3, 16, requires_grad=True)
    k = torch.randn(5, 1, 16, requires_grad=True)
    qw = torch.rand(16, requires_grad=True)
    kw = torch.rand(16, requires_grad=True)
    pos = torch.tensor([0, 3, 31, 4, 4])
    torch.library.opcheck(torch.ops.qwen3_fast.qk_norm_rope_fwd.default,
                          (q, k, qw, kw, cos, sin, pos, EPS, "cpu"))
    q_out, k_out, q_rstd, k_rstd = torch.ops.qwen3_fast.qk_norm_rope_fwd(
        q.detach(), k.detach(), qw.detach(), kw.detach(), cos, sin, pos, EPS, "cpu")
    torch.library.opcheck(torch.ops.qwen3_fast.qk_norm_rope_bwd.default,
                          (torch.randn(5, 3, 16), torch.randn(5, 1, 16), q.detach(), k.detach(),
                           qw.detach(), kw.detach(), cos, sin, pos, q_rstd, k_rstd, "cpu"))
    torch.library.opcheck(torch.ops.qwen3_fast.qk_norm_rope_.default,
                          (q.detach().clone(), k.detach().clone(), qw.detach(), kw.detach(), cos,
                           sin, pos, EPS, "cpu"))


@needs_c
def test_torch_compile_fullgraph_smoke():
    torch._dynamo.reset()
    cos, sin = _tables(64)
    q, k, qw, kw, pos = _inputs((2, 5), 4, 2, 64, torch.bfloat16, seed=9)
    q.requires_grad_()
    k.requires_grad_()
    qw.requires_grad_()

    def f(q, k, qw, kw, pos):
        a, b = ops.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
        return a.float().sum() + (b.float() ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, qw, kw, pos)
    grads = torch.autograd.grad(out, (q, k, qw))
    eager = f(q, k, qw, kw, pos)
    grads_eager = torch.autograd.grad(eager, (q, k, qw))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)

    def g(q, k):
        return ops.qk_norm_rope_(q, k, qw.detach(), kw, cos, sin, pos, EPS)

    qi, ki = q.detach().clone(), k.detach().clone()
    with torch.no_grad():
        torch.compile(g, fullgraph=True, backend="aot_eager")(qi, ki)
        q_ref, k_ref = ops.qk_norm_rope(q, k, qw, kw, cos, sin, pos, EPS)
    assert torch.equal(qi, q_ref) and torch.equal(ki, k_ref)


def _bad_cases():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    w = torch.ones(8)
    cos, sin = ops.rope_cache({"head_dim": 8, "rope_theta": 1e4}, 16)
    pos = torch.arange(4)
    ok = dict(q=q, k=k, q_weight=w, k_weight=w, cos=cos, sin=sin, positions=pos, eps=EPS)

    def case(exc, match, **changes):
        return pytest.param({**ok, **changes}, exc, match, id=match[:40])

    return [
        case(ValueError, "q has head_dim 7; expected an even", q=torch.randn(4, 2, 7),
             k=torch.randn(4, 1, 7), q_weight=torch.ones(7), k_weight=torch.ones(7),
             cos=torch.ones(16, 7), sin=torch.ones(16, 7)),
        case(ValueError, "k has head_dim 6", k=torch.randn(4, 1, 6)),
        case(ValueError, "k has shape", k=torch.randn(3, 1, 8)),
        case(ValueError, "q must be", q=torch.randn(1, 4, 2, 8, 1)),
        case(ValueError, "q must have at least 3", q=torch.randn(4, 8)),
        case(ValueError, r"q_weight has shape \(4,\)", q_weight=torch.ones(4)),
        case(ValueError, "k_weight must be 1-D", k_weight=torch.ones(2, 4)),
        case(TypeError, "q_weight has dtype torch.float16", q_weight=w.half()),
        case(TypeError, "k_weight has dtype torch.float64", k_weight=w.double()),
        case(TypeError, "k has dtype torch.bfloat16", k=k.bfloat16()),
        case(TypeError, "q has dtype torch.int64", q=q.long()),
        case(ValueError, r"cos has shape \(16, 4\)", cos=cos[:, :4]),
        case(ValueError, "sin has shape", sin=sin[:8]),
        case(ValueError, "cos has no rows", cos=cos[:0], sin=sin[:0]),
        case(TypeError, "positions must be an int32/int64", positions=pos.float()),
        case(ValueError, r"positions has shape \(3,\)", positions=pos[:3]),
        case(ValueError, "positions is on meta", positions=pos.to("meta")),
        case(ValueError, "k_weight is on meta", k_weight=w.to("meta")),
        case(ValueError, "q must be contiguous in its last", q=torch.randn(4, 8, 2).transpose(1, 2)),
        case(ValueError, "eps must be", eps=-1.0),
        case(ValueError, r"positions: value 16 .*out of range \[0, 16\)",
             positions=torch.tensor([0, 1, 16, 2])),
        case(ValueError, r"positions: value -1 .*out of range", positions=torch.tensor([0, -1, 1, 2])),
    ]


@pytest.mark.parametrize("backend", [
    "reference", pytest.param("cpu", marks=needs_c)])
@pytest.mark.parametrize("kwargs,exc,match", _bad_cases())
def test_bad_inputs_are_named(backend, kwargs, exc, match):
    with ops.use_backend(backend), pytest.raises(exc, match=match):
        ops.qk_norm_rope(**kwargs)


@needs_c
def test_out_of_range_position_leaves_inplace_inputs_untouched():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    q0, k0 = q.clone(), k.clone()
    cos, sin = ops.rope_cache({"head_dim": 8, "rope_theta": 1e4}, 16)
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="positions: value 99"):
        ops.qk_norm_rope_(q, k, torch.ones(8), torch.ones(8), cos, sin,
                          torch.tensor([0, 99, 1, 2]))
    assert torch.equal(q, q0) and torch.equal(k, k0)
