"""linear_cross_entropy: every backend against logits + F.cross_entropy (loss, d hidden, d weight)."""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference
from qwen3_fast.ops.linear_cross_entropy import default_chunk_size

from conftest import HAS_CUDA, assert_close_to_oracle, require_interpreted_triton

TRITON_KERNELS = {"qwen3_fast.ops.triton.linear_cross_entropy": "_ce_rows_kernel"}


def _inputs(t, h, v, dtype, device="cpu", seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device=device, dtype=dtype)
    weight.requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, labels.to(device)


def _oracle(hidden, weight, labels, reduction="mean", dtype=None):
    """The unfused path in the inputs' dtype (HF's lm_head + fp32 CE) and its gradients."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = reference.linear_cross_entropy(h, w, labels, -100, reduction)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), dh, dw


def _ours(hidden, weight, labels, backend=None, **kw):
    with ops.use_backend(backend):
        loss = ops.linear_cross_entropy(hidden, weight, labels, **kw)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), dh, dw


def _compare(ours, oracle, dtype, scale=1.0):
    for name, a, o in zip(("loss", "d_hidden", "d_weight"), ours, oracle):
        assert a.dtype == o.dtype, f"{name}: {a.dtype} != {o.dtype}"
        assert_close_to_oracle(a, o.double(), dtype if name != "loss" else torch.float32,
                               scale=scale if name != "loss" else 4 * scale, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("t,h,v,chunk", [(1, 8, 5, None), (37, 24, 301, 8), (64, 32, 1000, 64),
                                         (33, 16, 517, 1)])
def test_chunked_matches_unfused(dtype, reduction, t, h, v, chunk):
    hidden, weight, labels = _inputs(t, h, v, dtype, ignore_every=4 if t > 1 else 0)
    ours = _ours(hidden, weight, labels, reduction=reduction, chunk_size=chunk)
    _compare(ours, _oracle(hidden, weight, labels, reduction), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_qwen3_vocab(dtype):
    """V = 151936 (Qwen3), small T and H, chunks that split the tokens unevenly."""
    hidden, weight, labels = _inputs(19, 16, 151936, dtype, seed=3, ignore_every=3)
    ours = _ours(hidden, weight, labels, chunk_size=8)
    _compare(ours, _oracle(hidden, weight, labels), dtype)


def test_leading_dims_and_int32_labels():
    hidden, weight, labels = _inputs(24, 16, 97, torch.float32)
    h3 = hidden.detach().view(2, 12, 16).requires_grad_()
    with torch.no_grad():
        loss3 = ops.linear_cross_entropy(h3, weight, labels.view(2, 12).to(torch.int32))
    torch.testing.assert_close(loss3, reference.linear_cross_entropy(hidden, weight, labels))


def test_all_ignored_mean_is_nan_like_torch_and_sum_is_zero():
    hidden, weight, labels = _inputs(6, 8, 11, torch.float32)
    labels.fill_(-100)
    assert torch.isnan(ops.linear_cross_entropy(hidden, weight, labels))
    assert torch.isnan(reference.linear_cross_entropy(hidden, weight, labels))
    loss, dh, dw = _ours(hidden, weight, labels, reduction="sum")
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_grad_output_scales_gradients_and_no_grad_skips_them():
    hidden, weight, labels = _inputs(10, 8, 13, torch.float32)
    loss = ops.linear_cross_entropy(hidden, weight, labels)
    dh, dw = torch.autograd.grad(3.0 * loss, (hidden, weight))
    _, rh, rw = _oracle(hidden, weight, labels)
    torch.testing.assert_close(dh, 3 * rh)
    torch.testing.assert_close(dw, 3 * rw)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, labels), loss.detach())


def test_only_weight_requires_grad():
    hidden, weight, labels = _inputs(10, 8, 13, torch.float32)
    hidden = hidden.detach()
    loss = ops.linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    (dw,) = torch.autograd.grad(loss, (weight,))
    torch.testing.assert_close(dw, _oracle(hidden, weight, labels)[2])


def test_gradcheck_float64():
    hidden, weight, labels = _inputs(7, 5, 9, torch.float64, ignore_every=3)
    assert torch.autograd.gradcheck(
        lambda h, w: ops.linear_cross_entropy(h, w, labels, chunk_size=3), (hidden, weight))


def test_autocast_casts_like_linear():
    hidden, weight, labels = _inputs(12, 16, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(hidden, weight, labels)
    ref = reference.linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    dw = torch.autograd.grad(loss, weight)[0]
    assert dw.dtype == torch.float32


def test_compile_fullgraph():
    hidden, weight, labels = _inputs(16, 8, 31, torch.float32)
    fn = torch.compile(lambda h, w, y: ops.linear_cross_entropy(h, w, y, chunk_size=5),
                       fullgraph=True, backend="aot_eager")
    loss = fn(hidden, weight, labels)
    torch.testing.assert_close(loss, reference.linear_cross_entropy(hidden, weight, labels))


def test_opcheck():
    hidden, weight, labels = _inputs(9, 8, 17, torch.float32)
    torch.library.opcheck(torch.ops.qwen3_fast.linear_cross_entropy_fwd.default,
                          (hidden, weight, labels, -100, "mean", 4, "chunked", True, True),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@pytest.mark.parametrize("bad,exc,match", [
    (dict(hidden=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "hidden has dtype"),
    (dict(weight=torch.zeros(5, 3)), ValueError, "hidden has last dimension 4; expected 3"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(labels=torch.zeros(3)), TypeError, "labels has dtype"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels has shape"),
    (dict(labels=torch.tensor([0, 5, 1])), ValueError, r"labels has value 5; expected values in \[0, 5\)"),
    (dict(reduction="none"), ValueError, "reduction must be"),
    (dict(chunk_size=0), ValueError, "chunk_size must be"),
])
def test_bad_inputs(bad, exc, match):
    args = dict(hidden=torch.zeros(3, 4), weight=torch.zeros(5, 4),
                labels=torch.tensor([0, 1, -100]), reduction="mean", chunk_size=None)
    args.update(bad)
    with pytest.raises(exc, match=match):
        ops.linear_cross_entropy(args["hidden"], args["weight"], args["labels"],
                                 reduction=args["reduction"], chunk_size=args["chunk_size"])


def test_default_chunk_size_bounds_logits():
    assert default_chunk_size(10_000, 151936) == 256
    assert default_chunk_size(10, 256) == 4096
    assert default_chunk_size(10, 10 ** 9) == 16


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,v,chunk", [(21, 16, 300, 8), (5, 8, 5000, 2)])
def test_triton_interpreted_matches_unfused(dtype, t, h, v, chunk):
    require_interpreted_triton(TRITON_KERNELS)
    hidden, weight, labels = _inputs(t, h, v, dtype, seed=5, ignore_every=3)
    ours = _ours(hidden, weight, labels, backend="triton", chunk_size=chunk)
    _compare(ours, _oracle(hidden, weight, labels), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["triton", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_full_vocab(backend, dtype):
    hidden, weight, labels = _inputs(1000, 1024, 151936, dtype, device="cuda", seed=7)
    ours = _ours(hidden, weight, labels, backend=backend)
    _compare(ours, _oracle(hidden, weight, labels), dtype, scale=2)


def test_model_loss_is_fused_when_logits_are_not_requested():
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8))
    ids = torch.randint(0, 300, (2, 9))
    labels = ids.masked_fill(torch.rand(2, 9) < 0.3, -100)
    hf = model(ids, labels=labels)
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None and hf.logits.shape == (2, 9, 300)
    torch.testing.assert_close(fused.loss, hf.loss, rtol=1e-6, atol=1e-6)
    g_hf = torch.autograd.grad(hf.loss, model.lm_head.weight)[0]
    g_fused = torch.autograd.grad(fused.loss, model.lm_head.weight)[0]
    torch.testing.assert_close(g_fused, g_hf, rtol=1e-5, atol=1e-7)
    total = model(ids, labels=labels, return_logits=False, loss_reduction="sum").loss
    torch.testing.assert_close(total, hf.loss * (labels[:, 1:] != -100).sum(), rtol=1e-6,
                               atol=1e-5)
