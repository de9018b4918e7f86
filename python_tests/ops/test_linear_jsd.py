"""linear_jsd: hand-computed divergences, F.kl_div at the endpoints, and every backend
against the unfused oracle (values and student gradients)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen3_fast import ops
from qwen3_fast.ops import reference
from qwen3_fast.ops.linear_jsd import default_jsd_chunk_size

from conftest import HAS_CUDA, assert_close_to_oracle, require_interpreted_triton

TRITON_KERNELS = {"qwen3_fast.ops.triton.linear_jsd": "_jsd_rows_kernel"}


def _inputs(t, hs, ht, v, dtype, device="cpu", seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(t, hs, generator=g).to(device=device, dtype=dtype).requires_grad_()
    sw = (torch.randn(v, hs, generator=g) * 2 * hs ** -0.5).to(device=device, dtype=dtype)
    sw.requires_grad_()
    th = torch.randn(t, ht, generator=g).to(device=device, dtype=dtype)
    tw = (torch.randn(v, ht, generator=g) * 2 * ht ** -0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (t,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return sh, sw, th, tw, labels.to(device)


def _upstream(out, seed=1):
    """A fixed, non-uniform upstream gradient for 'none' (so per-token scaling is tested)."""
    if out.dim() == 0:
        return torch.ones_like(out)
    return torch.rand(out.shape, generator=torch.Generator().manual_seed(seed)).to(out) + 0.5


def _oracle(sh, sw, th, tw, labels, beta, temperature=1.0, reduction="mean"):
    h, w = sh.detach().requires_grad_(), sw.detach().requires_grad_()
    out = reference.linear_jsd(h, w, th, tw, labels, beta, temperature, -100, reduction)
    dh, dw = torch.autograd.grad(out, (h, w), _upstream(out))
    return out.detach(), dh, dw


def _ours(sh, sw, th, tw, labels, beta, backend=None, **kw):
    with ops.use_backend(backend):
        out = ops.linear_jsd(sh, sw, th, tw, labels, beta=beta, **kw)
    dh, dw = torch.autograd.grad(out, (sh, sw), _upstream(out))
    return out.detach(), dh, dw


def _compare(ours, oracle, dtype, scale=1.0):
    for name, a, o in zip(("loss", "d_hidden", "d_weight"), ours, oracle):
        assert a.dtype == o.dtype, f"{name}: {a.dtype} != {o.dtype}"
        assert_close_to_oracle(a, o.double(), dtype if name != "loss" else torch.float32,
                               scale=scale if name != "loss" else 4 * scale, name=name)


# ------------------------------------------------------------------ hand-written values
P_S = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]
P_T = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]


def _hand_jsd(ps, pt, beta):
    """Plain-Python generalized JSD of two probability lists."""
    if beta == 0.0:
        return sum(b * math.log(b / a) for a, b in zip(ps, pt))
    if beta == 1.0:
        return sum(a * math.log(a / b) for a, b in zip(ps, pt))
    m = [(1 - beta) * a + beta * b for a, b in zip(ps, pt)]
    return (beta * sum(b * math.log(b / c) for b, c in zip(pt, m))
            + (1 - beta) * sum(a * math.log(a / c) for a, c in zip(ps, m)))


def _powered(p, temperature):
    """softmax(log p / temperature) in plain Python."""
    q = [x ** (1 / temperature) for x in p]
    return [x / sum(q) for x in q]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.25])
def test_fixed_distributions_hand_computed(beta, temperature):
    """hidden = [1] and weight = log p make the logits log p, so P_S / P_T are the lists."""
    ones = torch.ones(1, 1, dtype=torch.float64)
    labels = torch.tensor([0])
    for ps, pt in zip(P_S, P_T):
        sw = torch.tensor(ps, dtype=torch.float64).log().unsqueeze(1)  # [3, 1]
        tw = torch.tensor(pt, dtype=torch.float64).log().unsqueeze(1)
        got = ops.linear_jsd(ones, sw, ones, tw, labels, beta=beta, temperature=temperature)
        want = _hand_jsd(_powered(ps, temperature), _powered(pt, temperature), beta)
        assert abs(got.item() - want) < 1e-12, (got.item(), want)
    # the plain-Python helper itself, written out for the first pair's forward KL
    fwd = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert abs(_hand_jsd(P_S[0], P_T[0], 0.0) - fwd) < 1e-15


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_endpoints_equal_kl_div(beta):
    sh, sw, th, tw, labels = _inputs(11, 8, 12, 40, torch.float64, ignore_every=0)
    log_ps = torch.log_softmax(sh @ sw.t() / 1.3, -1)
    log_pt = torch.log_softmax(th @ tw.t() / 1.3, -1)
    if beta == 0.0:  # forward KL(P_T || P_S)
        want = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    else:  # reverse KL(P_S || P_T)
        want = F.kl_div(log_pt, log_ps, reduction="batchmean", log_target=True)
    got = ops.linear_jsd(sh, sw, th, tw, labels, beta=beta, temperature=1.3, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dh_want = torch.autograd.grad(want, sh)[0]
    torch.testing.assert_close(torch.autograd.grad(got, sh)[0], dh_want, rtol=1e-10,
                               atol=1e-12)


def test_mixture_is_not_an_endpoint_and_is_symmetric_at_half():
    sh, sw, th, tw, labels = _inputs(9, 8, 8, 30, torch.float64, ignore_every=0)
    kw = dict(reduction="none", chunk_size=4)
    half = ops.linear_jsd(sh, sw, th, tw, labels, beta=0.5, **kw)
    swapped = ops.linear_jsd(th, tw, sh, sw, labels, beta=0.5, **kw)
    torch.testing.assert_close(half, swapped, rtol=1e-12, atol=1e-14)
    assert (half <= math.log(2) + 1e-12).all()  # JSD_0.5 is bounded by ln 2
    fwd = ops.linear_jsd(sh, sw, th, tw, labels, beta=0.0, **kw)
    assert (half < fwd).all()


# ------------------------------------------------------------------ against the oracle
SHAPE_A = (13, 16, 24, 301, 5, 1.0)  # (T, Hs, Ht, V, chunk_size, temperature)
CASES = ([(SHAPE_A, b, r) for b in (0.0, 0.5, 1.0) for r in ("none", "sum", "mean")]
         + [((8, 8, 8, 97, None, 2.5), b, r) for b, r in ((0.0, "sum"), (0.5, "mean"),
                                                           (1.0, "none"))]
         + [((17, 24, 12, 517, 1, 0.7), b, r) for b, r in ((0.0, "none"), (0.5, "sum"),
                                                            (1.0, "mean"))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,beta,reduction", CASES, ids=lambda x: str(x))
def test_chunked_matches_unfused(dtype, shape, beta, reduction):
    t, hs, ht, v, chunk, temp = shape
    args = _inputs(t, hs, ht, v, dtype)
    ours = _ours(*args, beta, temperature=temp, reduction=reduction, chunk_size=chunk)
    _compare(ours, _oracle(*args, beta, temp, reduction), dtype)


def test_full_qwen3_vocab():
    """V = 151936 (Qwen3), different hidden sizes, chunks that split the tokens unevenly."""
    args = _inputs(9, 16, 8, 151936, torch.float32, seed=3, ignore_every=3)
    ours = _ours(*args, 0.5, temperature=1.5, chunk_size=4)
    _compare(ours, _oracle(*args, 0.5, 1.5), torch.float32)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_masked_rows_give_zero_loss_and_zero_grad(beta, reduction):
    sh, sw, th, tw, labels = _inputs(12, 8, 6, 50, torch.float32, ignore_every=3)
    masked = labels == -100
    out = ops.linear_jsd(sh, sw, th, tw, labels, beta=beta, reduction="none", chunk_size=5)
    assert (out[masked] == 0).all() and (out[~masked] > 0).all()
    loss = ops.linear_jsd(sh, sw, th, tw, labels, beta=beta, reduction=reduction, chunk_size=5)
    dh, dw = torch.autograd.grad(loss, (sh, sw), torch.ones_like(loss))
    assert (dh[masked] == 0).all() and (dh[~masked] != 0).any()
    # the weight gradient equals that of the unmasked rows alone
    keep = ~masked
    sub = ops.linear_jsd(sh[keep], sw, th[keep], tw, labels[keep], beta=beta,
                         reduction=reduction)
    dw_sub = torch.autograd.grad(sub, sw, torch.ones_like(sub))[0]
    torch.testing.assert_close(dw, dw_sub, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_nonnegative_and_zero_when_teacher_is_student(beta):
    sh, sw, th, tw, labels = _inputs(10, 8, 16, 64, torch.float32, ignore_every=0)
    out = ops.linear_jsd(sh, sw, th, tw, labels, beta=beta, temperature=0.5,
                         reduction="none")
    assert (out >= 0).all()
    same = ops.linear_jsd(sh, sw, sh.detach(), sw.detach(), labels, beta=beta,
                          temperature=0.5, reduction="sum", chunk_size=3)
    assert abs(same.item()) < 1e-5
    dh, dw = torch.autograd.grad(same, (sh, sw))
    assert dh.abs().max() < 1e-5 and dw.abs().max() < 1e-5


def test_reductions_and_all_masked():
    sh, sw, th, tw, labels = _inputs(10, 8, 8, 20, torch.float32)
    none = ops.linear_jsd(sh, sw, th, tw, labels, reduction="none")
    total = ops.linear_jsd(sh, sw, th, tw, labels, reduction="sum")
    mean = ops.linear_jsd(sh, sw, th, tw, labels, reduction="mean")
    assert none.shape == (10,) and none.dtype == torch.float32
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / (labels != -100).sum())
    labels = torch.full_like(labels, -100)
    assert torch.isnan(ops.linear_jsd(sh, sw, th, tw, labels))  # 0/0, like F.cross_entropy
    loss = ops.linear_jsd(sh, sw, th, tw, labels, reduction="sum")
    dh, dw = torch.autograd.grad(loss, (sh, sw))
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_leading_dims_grad_output_no_grad_and_teacher_constant():
    sh, sw, th, tw, labels = _inputs(12, 8, 6, 30, torch.float32)
    tw.requires_grad_()  # a frozen teacher whose parameters still require grad: ignored
    out = ops.linear_jsd(sh.view(3, 4, 8), sw, th.view(3, 4, 6), tw, labels.view(3, 4),
                         reduction="none")
    assert out.shape == (3, 4)
    flat = ops.linear_jsd(sh, sw, th, tw, labels, reduction="none")
    torch.testing.assert_close(out.reshape(-1), flat)
    loss = ops.linear_jsd(sh, sw, th, tw, labels)
    dh, dw = torch.autograd.grad(3.0 * loss, (sh, sw), retain_graph=True)
    _, rh, rw = _oracle(sh, sw, th, tw.detach(), labels, 0.5)
    torch.testing.assert_close(dh, 3 * rh)
    torch.testing.assert_close(dw, 3 * rw)
    loss.backward()
    assert tw.grad is None
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_jsd(sh, sw, th, tw, labels), loss.detach())
    only_w = ops.linear_jsd(sh.detach(), sw, th, tw, labels, chunk_size=5, reduction="none")
    (dw2,) = torch.autograd.grad(only_w, (sw,), _upstream(only_w))
    torch.testing.assert_close(dw2, _oracle(sh, sw, th, tw.detach(), labels, 0.5,
                                            reduction="none")[2])


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gradcheck_float64(beta, reduction):
    sh, sw, th, tw, labels = _inputs(7, 5, 3, 9, torch.float64, ignore_every=3)
    assert torch.autograd.gradcheck(
        lambda h, w: ops.linear_jsd(h, w, th, tw, labels, beta=beta, temperature=1.5,
                                    chunk_size=3, reduction=reduction), (sh, sw))


def test_teacher_and_student_in_different_dtypes():
    """A bf16 teacher with an fp32 student: each lm_head in its own dtype, then fp32."""
    sh, sw, _, _, labels = _inputs(10, 8, 8, 40, torch.float32)
    _, _, th, tw, _ = _inputs(10, 8, 12, 40, torch.bfloat16, seed=4)
    ours = _ours(sh, sw, th, tw, labels, 0.5, reduction="none", chunk_size=3)
    _compare(ours, _oracle(sh, sw, th, tw, labels, 0.5, reduction="none"), torch.float32)


def test_autocast_casts_like_linear():
    sh, sw, th, tw, labels = _inputs(12, 16, 8, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_jsd(sh, sw, th, tw, labels)
    ref = reference.linear_jsd(sh.bfloat16(), sw.bfloat16(), th.bfloat16(), tw.bfloat16(),
                               labels)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    assert torch.autograd.grad(loss, sw)[0].dtype == torch.float32


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_compile_fullgraph_with_backward(reduction):
    sh, sw, th, tw, labels = _inputs(16, 8, 6, 31, torch.float32)
    fn = torch.compile(lambda a, b, c, d, y: ops.linear_jsd(a, b, c, d, y, beta=0.3,
                                                            chunk_size=5,
                                                            reduction=reduction),
                       fullgraph=True, backend="aot_eager")
    out = fn(sh, sw, th, tw, labels)
    dh, dw = torch.autograd.grad(out, (sh, sw), _upstream(out))
    _compare((out.detach(), dh, dw), _oracle(sh, sw, th, tw, labels, 0.3, 1.0, reduction),
             torch.float32)


def test_opcheck():
    sh, sw, th, tw, labels = _inputs(9, 8, 4, 17, torch.float32)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for red in ("mean", "none"):
        torch.library.opcheck(torch.ops.qwen3_fast.linear_jsd_fwd.default,
                              (sh, sw, th, tw, labels, 0.5, 1.0, -100, red, 4, "chunked",
                               True, True), test_utils=utils)
    torch.library.opcheck(torch.ops.qwen3_fast.linear_jsd_bwd.default,
                          (torch.rand(9), sh.detach(), sw.detach(), th, tw, labels, 0.5, 1.0,
                           -100, 4, "chunked", True, True), test_utils=utils[:2])


@pytest.mark.parametrize("bad,exc,match", [
    (dict(sh=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "student_hidden has dtype"),
    (dict(sw=torch.zeros(5, 3)), ValueError, "student_hidden has last dimension 4; expected 3"),
    (dict(sw=torch.zeros(5, 4, dtype=torch.float64)), TypeError, "student_weight has dtype"),
    (dict(th=torch.zeros(3, 6, dtype=torch.float16)), TypeError, "teacher_weight has dtype"),
    (dict(th=torch.zeros(2, 6)), ValueError, "teacher_hidden has shape"),
    (dict(tw=torch.zeros(5, 5)), ValueError, "teacher_hidden has last dimension 6"),
    (dict(tw=torch.zeros(7, 6)), ValueError, "teacher_weight has 7 rows.*share a vocabulary"),
    (dict(tw=torch.zeros(5, 6, 1)), ValueError, "teacher_weight must be 2-D"),
    (dict(labels=torch.zeros(3)), TypeError, "labels has dtype"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels has shape"),
    (dict(beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    (dict(beta=-0.1), ValueError, r"beta must be in \[0, 1\]"),
    (dict(beta="0.5"), TypeError, "beta must be a float"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be"),
    (dict(reduction="batchmean"), ValueError, "reduction must be"),
    (dict(chunk_size=0), ValueError, "chunk_size must be"),
    (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
])
def test_bad_inputs(bad, exc, match):
    args = dict(sh=torch.zeros(3, 4), sw=torch.zeros(5, 4), th=torch.zeros(3, 6),
                tw=torch.zeros(5, 6), labels=torch.tensor([0, 1, -100]))
    kw = dict(beta=0.5, temperature=1.0, reduction="mean", chunk_size=None, ignore_index=-100)
    for k, v in bad.items():
        (args if k in args else kw)[k] = v
    with pytest.raises(exc, match=match):
        ops.linear_jsd(args["sh"], args["sw"], args["th"], args["tw"], args["labels"], **kw)


def test_default_chunk_size_bounds_logits():
    assert default_jsd_chunk_size(10_000, 151936) == 128  # 78 MB per fp32 [128, V] buffer
    assert default_jsd_chunk_size(10, 256) == 4096


def test_reference_backend_is_the_oracle():
    args = _inputs(6, 8, 8, 20, torch.float32)
    _compare(_ours(*args, 0.5, backend="reference", reduction="none"),
             _oracle(*args, 0.5, reduction="none"), torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("dtype,beta,reduction", [
    (torch.float32, 0.0, "mean"), (torch.float32, 0.5, "none"), (torch.float32, 1.0, "sum"),
    (torch.float32, 0.3, "mean"), (torch.bfloat16, 0.5, "none")])
def test_triton_interpreted_matches_unfused(dtype, beta, reduction):
    require_interpreted_triton(TRITON_KERNELS)
    args = _inputs(11, 16, 8, 300, dtype, seed=5, ignore_every=3)
    ours = _ours(*args, beta, backend="triton", temperature=1.5, reduction=reduction,
                 chunk_size=4)
    _compare(ours, _oracle(*args, beta, 1.5, reduction), dtype)


@pytest.mark.triton
def test_triton_interpreted_large_vocab_no_grad():
    """Several BLOCK-wide vocabulary passes (V > 4096) and the loss-only kernel variant."""
    require_interpreted_triton(TRITON_KERNELS)
    sh, sw, th, tw, labels = _inputs(3, 8, 8, 5000, torch.float32, seed=2, ignore_every=2)
    with torch.no_grad(), ops.use_backend("triton"):
        got = ops.linear_jsd(sh, sw, th, tw, labels, beta=0.5, reduction="none")
    want = reference.linear_jsd(sh, sw, th, tw, labels, 0.5, reduction="none")
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["triton", None])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_cuda_full_vocab(backend, beta):
    args = _inputs(512, 1024, 2048, 151936, torch.bfloat16, device="cuda", seed=7)
    ours = _ours(*args, beta, backend=backend, temperature=1.2)
    _compare(ours, _oracle(*args, beta, 1.2), torch.bfloat16, scale=2)
