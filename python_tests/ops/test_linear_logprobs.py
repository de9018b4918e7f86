"""linear_logprobs: every backend against full logits + log_softmax + gather + entropy
(values, d hidden, d weight through both outputs with random upstream gradients)."""
from __future__ import annotations

import importlib

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference
from qwen3_fast.ops.linear_cross_entropy import default_chunk_size as ce_default_chunk_size
from qwen3_fast.ops.linear_logprobs import default_chunk_size

from conftest import HAS_CUDA, assert_close_to_oracle, require_interpreted_triton

TRITON_KERNELS = {"qwen3_fast.ops.triton.linear_logprobs": "_logprob_rows_kernel"}


def _inputs(t, h, v, dtype, device="cpu", seed=0, ignore_every=4, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(t, h, generator=g) * scale).to(device=device, dtype=dtype)
    hidden.requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device=device, dtype=dtype)
    weight.requires_grad_()
    targets = torch.randint(0, v, (t,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    # upstream gradients of (logprobs, entropy), as a GRPO loss would send them
    grads = (torch.randn(t, generator=g).to(device), torch.randn(t, generator=g).to(device))
    return hidden, weight, targets.to(device), grads


def _grads(lp, ent, leaves, grads, use=("lp", "ent")):
    gl, ge = grads
    loss = 0
    if "lp" in use:
        loss = loss + (lp * gl.to(lp.dtype)).sum()
    if "ent" in use:
        loss = loss + (ent * ge.to(ent.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


def _oracle(hidden, weight, targets, grads, temperature=1.0, use=("lp", "ent")):
    """The unfused path and its gradients: in float64 for float32 inputs (the exact value;
    an fp32 oracle differs from the chunked fp32 sums by as much as they differ from the
    truth), in the inputs' dtype for half inputs (the bf16 logits are part of the spec)."""
    up = torch.float64 if hidden.dtype == torch.float32 else hidden.dtype
    h = hidden.detach().to(up).requires_grad_()
    w = weight.detach().to(up).requires_grad_()
    lp, ent = reference.linear_logprobs(h, w, targets, temperature)
    dh, dw = _grads(lp, ent, (h, w), grads, use)
    return lp.detach(), ent.detach(), dh, dw


def _ours(hidden, weight, targets, grads, backend=None, use=("lp", "ent"), **kw):
    with ops.use_backend(backend):
        lp, ent = ops.linear_logprobs(hidden, weight, targets, **kw)
    dh, dw = _grads(lp, ent, (hidden, weight), grads, use)
    return lp.detach(), ent.detach(), dh, dw


# fp32 gradients at large V: d_hidden sums V terms that cancel, so even the unfused fp32
# path (full logits + log_softmax) is 1.9e-6 (V = 5000) to 3.1e-6 (V = 151936) away from the
# float64 oracle in the norm; these cases get twice the float32 tolerance.
LARGE_V_SCALE = 2.0


def _compare(ours, oracle, dtype, scale=1.0):
    for name, a, o in zip(("logprobs", "entropy", "d_hidden", "d_weight"), ours, oracle):
        out = name in ("logprobs", "entropy")
        want = torch.float32 if out else dtype
        assert a.dtype == want, f"{name}: {a.dtype} != {want}"
        assert_close_to_oracle(a, o.double(), torch.float32 if out else dtype,
                               scale=4 * scale if out else scale, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,v,chunk,temperature", [
    (1, 8, 5, None, 1.0), (1, 8, 5, None, 0.6), (37, 24, 301, 8, 0.6), (37, 24, 301, 8, 1.0),
    (33, 16, 517, 1, 1.0), (64, 32, 1000, 64, 0.6)])
def test_chunked_matches_unfused(dtype, temperature, t, h, v, chunk):
    hidden, weight, targets, grads = _inputs(t, h, v, dtype, ignore_every=4 if t > 1 else 0)
    ours = _ours(hidden, weight, targets, grads, temperature=temperature, chunk_size=chunk)
    _compare(ours, _oracle(hidden, weight, targets, grads, temperature), dtype)


@pytest.mark.parametrize("dtype,backend", [
    (torch.float32, None), (torch.bfloat16, None),
    pytest.param(torch.bfloat16, "triton", marks=pytest.mark.triton)])
def test_backward_tiles_over_tokens_and_vocabulary(monkeypatch, dtype, backend):
    """Token blocks of 8 rows: grad_weight summed over 5 blocks per vocabulary slice
    (fp32 slice accumulator for bf16), 3 slices summed into grad_hidden."""
    mod = importlib.import_module("qwen3_fast.ops.linear_logprobs")  # the module, not the op
    if backend == "triton":
        require_interpreted_triton(TRITON_KERNELS)
    monkeypatch.setattr(mod, "TOKEN_BLOCK", 8)
    assert mod.backward_tiles(37, 301, 4) == (8, 150)
    hidden, weight, targets, grads = _inputs(37, 24, 301, dtype, seed=2)
    ours = _ours(hidden, weight, targets, grads, backend=backend, temperature=1.3,
                 chunk_size=4)
    _compare(ours, _oracle(hidden, weight, targets, grads, 1.3), dtype)


def test_backward_tiles_budget():
    from qwen3_fast.ops.linear_logprobs import TOKEN_BLOCK, backward_tiles

    assert backward_tiles(512, 151936, 256) == (512, 75968)  # 2 slices, one token block
    rows, cols = backward_tiles(10_000, 151936, 256)
    assert rows == TOKEN_BLOCK and rows * cols <= 256 * 151936
    assert backward_tiles(3, 5, 100) == (3, 5)


def test_no_tokens():
    hidden, weight, _, _ = _inputs(0, 8, 13, torch.float32)
    lp, ent = ops.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)
    dh, dw = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    assert dh.shape == (0, 8) and dw.shape == (13, 8) and dw.abs().max() == 0


@pytest.mark.parametrize("use", [("lp",), ("ent",)], ids=["logprobs_only", "entropy_only"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_gradient_through_one_output(use, temperature):
    """The other output unused: its upstream gradient is zero / undefined."""
    hidden, weight, targets, grads = _inputs(29, 16, 211, torch.float32, seed=1, scale=3.0)
    ours = _ours(hidden, weight, targets, grads, use=use, temperature=temperature, chunk_size=7)
    oracle = _oracle(hidden, weight, targets, grads, temperature, use=use)
    # peaked rows (hidden * 3): the backward recomputes the logits in other GEMM shapes than
    # the forward, which can move log p = s - lse by an ulp of s (~1e-6 here); the entropy
    # gradient p * (log p + H) amplifies that where log p + H is near 0 (measured 2.6e-6
    # against the float64 oracle with chunk_size=7; the unfused fp32 path: 7e-7)
    _compare(ours, oracle, torch.float32, scale=2.0)
    assert oracle[2].abs().max() > 0 and oracle[3].abs().max() > 0


def test_entropy_gradient_formula_on_one_row():
    """d H / d logits = -p * (log p + H), checked directly with H = 1 (identity weight)."""
    z = torch.tensor([[0.3, -1.2, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    eye = torch.eye(4, dtype=torch.float64)
    _, ent = ops.linear_logprobs(z, eye, torch.tensor([2]))
    (dz,) = torch.autograd.grad(ent.sum(), z)
    logp = torch.log_softmax(z.detach(), -1)
    h = -(logp.exp() * logp).sum()
    torch.testing.assert_close(ent, h.reshape(1))
    torch.testing.assert_close(dz, -logp.exp() * (logp + h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_qwen3_vocab(dtype):
    """V = 151936 (Qwen3), small T and H, chunks that split the tokens unevenly."""
    hidden, weight, targets, grads = _inputs(11, 16, 151936, dtype, seed=3, ignore_every=3)
    ours = _ours(hidden, weight, targets, grads, temperature=0.8, chunk_size=4)
    _compare(ours, _oracle(hidden, weight, targets, grads, 0.8), dtype, scale=LARGE_V_SCALE)


def test_ignored_rows_are_zero_with_no_gradient():
    hidden, weight, targets, grads = _inputs(8, 8, 13, torch.float32, ignore_every=0)
    targets[2:5] = -7
    lp, ent = ops.linear_logprobs(hidden, weight, targets, ignore_index=-7, chunk_size=3)
    assert (lp[2:5] == 0).all() and (ent[2:5] == 0).all()
    assert (lp[5:] < 0).all() and (ent[5:] > 0).all()
    dh, dw = _grads(lp, ent, (hidden, weight), grads)
    assert dh[2:5].abs().max() == 0 and dh[5:].abs().min() > 0
    targets.fill_(-7)
    lp, ent = ops.linear_logprobs(hidden, weight, targets, ignore_index=-7)
    dh, dw = _grads(lp, ent, (hidden, weight), grads)
    assert lp.abs().max() == 0 and ent.abs().max() == 0
    assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_leading_dims_int32_targets_and_no_grad():
    hidden, weight, targets, _ = _inputs(24, 16, 97, torch.float32)
    with torch.no_grad():
        lp3, ent3 = ops.linear_logprobs(hidden.view(2, 12, 16), weight,
                                        targets.view(2, 12).to(torch.int32), temperature=2.0)
    assert lp3.shape == ent3.shape == (2, 12) and not lp3.requires_grad
    rlp, rent = reference.linear_logprobs(hidden, weight, targets, 2.0)
    torch.testing.assert_close(lp3.reshape(-1), rlp)
    torch.testing.assert_close(ent3.reshape(-1), rent)


def test_only_weight_requires_grad_and_reference_backend():
    hidden, weight, targets, grads = _inputs(10, 8, 13, torch.float32)
    hidden = hidden.detach()
    lp, ent = ops.linear_logprobs(hidden, weight, targets, chunk_size=3)
    (dw,) = _grads(lp, ent, (weight,), grads)
    assert_close_to_oracle(dw, _oracle(hidden, weight, targets, grads)[3], torch.float32)
    ours = _ours(hidden.requires_grad_(), weight, targets, grads, backend="reference")
    _compare(ours, _oracle(hidden, weight, targets, grads), torch.float32)


def test_gradcheck_float64():
    hidden, weight, targets, _ = _inputs(7, 5, 9, torch.float64, ignore_every=3)
    assert torch.autograd.gradcheck(
        lambda h, w: ops.linear_logprobs(h, w, targets, temperature=0.7, chunk_size=3),
        (hidden, weight))


def test_autocast_casts_like_linear():
    hidden, weight, targets, grads = _inputs(12, 16, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = ops.linear_logprobs(hidden, weight, targets, temperature=0.9)
    rlp, rent = reference.linear_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, 0.9)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, rlp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent.detach(), rtol=1e-5, atol=1e-5)
    dh, dw = _grads(lp, ent, (hidden, weight), grads)
    assert dh.dtype == dw.dtype == torch.float32


def test_compile_fullgraph_forward_and_backward():
    hidden, weight, targets, grads = _inputs(16, 8, 31, torch.float32)

    def fn(h, w, y):
        lp, ent = ops.linear_logprobs(h, w, y, temperature=0.5, chunk_size=5)
        return (lp * grads[0]).sum() + (ent * grads[1]).sum(), lp, ent

    loss, lp, ent = torch.compile(fn, fullgraph=True, backend="aot_eager")(hidden, weight,
                                                                           targets)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    _compare((lp.detach(), ent.detach(), dh, dw),
             _oracle(hidden, weight, targets, grads, 0.5), torch.float32)


def test_opcheck():
    hidden, weight, targets, (gl, ge) = _inputs(9, 8, 17, torch.float32)
    torch.library.opcheck(torch.ops.qwen3_fast.linear_logprobs_fwd.default,
                          (hidden, weight, targets, 0.8, -100, 4, "chunked"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    with torch.no_grad():
        _, ent, lse = torch.ops.qwen3_fast.linear_logprobs_fwd(hidden, weight, targets, 0.8,
                                                               -100, 4, "chunked")
    torch.library.opcheck(torch.ops.qwen3_fast.linear_logprobs_bwd.default,
                          (gl, ge, hidden.detach(), weight.detach(), targets, lse, ent, 0.8,
                           -100, 4, "chunked", True, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad,exc,match", [
    (dict(hidden=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "hidden has dtype"),
    (dict(hidden=[[0.0] * 4] * 3), TypeError, "hidden must be a torch.Tensor"),
    (dict(weight=torch.zeros(5, 3)), ValueError, "hidden has last dimension 4; expected 3"),
    (dict(weight=torch.zeros(5, 4, 1)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(weight=torch.zeros(5, 4, device="meta")), ValueError, "weight is on meta"),
    (dict(targets=torch.zeros(3)), TypeError, "targets has dtype"),
    (dict(targets=[0, 1, 2]), TypeError, "targets must be a torch.Tensor"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), ValueError, "targets has shape"),
    (dict(targets=torch.zeros(3, dtype=torch.long, device="meta")), ValueError,
     "targets is on meta"),
    (dict(targets=torch.tensor([0, 5, 1])), ValueError,
     r"targets has value 5; expected values in \[0, 5\)"),
    (dict(targets=torch.tensor([0, -1, 1])), ValueError, "targets has value -1"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be"),
    (dict(temperature=float("nan")), ValueError, "temperature must be"),
    (dict(temperature=True), TypeError, "temperature must be a float"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(chunk_size=0), ValueError, "chunk_size must be"),
])
def test_bad_inputs(bad, exc, match):
    args = dict(hidden=torch.zeros(3, 4), weight=torch.zeros(5, 4),
                targets=torch.tensor([0, 1, -100]))
    args.update(bad)
    with pytest.raises(exc, match=match):
        ops.linear_logprobs(**args)


def test_default_chunk_size_is_linear_cross_entropy_s():
    assert default_chunk_size is ce_default_chunk_size
    assert default_chunk_size(10_000, 151936) == 256


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,v,chunk,temperature", [(21, 16, 300, 8, 1.0),
                                                     (5, 8, 5000, 2, 0.7)])
def test_triton_interpreted_matches_unfused(dtype, t, h, v, chunk, temperature):
    require_interpreted_triton(TRITON_KERNELS)
    hidden, weight, targets, grads = _inputs(t, h, v, dtype, seed=5, ignore_every=3)
    ours = _ours(hidden, weight, targets, grads, backend="triton", chunk_size=chunk,
                 temperature=temperature)
    _compare(ours, _oracle(hidden, weight, targets, grads, temperature), dtype,
             scale=LARGE_V_SCALE if v >= 5000 else 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["triton", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_full_vocab(backend, dtype):
    hidden, weight, targets, grads = _inputs(1000, 1024, 151936, dtype, device="cuda", seed=7)
    ours = _ours(hidden, weight, targets, grads, backend=backend, temperature=0.9)
    _compare(ours, _oracle(hidden, weight, targets, grads, 0.9), dtype, scale=2)
