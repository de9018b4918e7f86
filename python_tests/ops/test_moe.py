"""MoE ops: moe_experts / moe_route against the float64 reference and HF's
Qwen3MoeSparseMoeBlock (transformers 4.x) on the same weights, forward and all gradients;
moe_permute / moe_unpermute against the reference; bad inputs.

    pytest python_tests/ops/test_moe.py        # about 20 s on 2 CPU cores
"""
from __future__ import annotations

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

from conftest import assert_close_to_oracle, compiled_backends

DTYPES = [torch.float32, torch.bfloat16]
# (experts, top_k, tokens, hidden, intermediate): E in {1, 8, 128}, K in {1, 2, 8},
# T in {1, 7, 4096}. Each distinct per-expert row count costs oneDNN a kernel build on the
# first call, so the 4096-token case (small H and I) uses 8 experts; E = 128 runs with few
# tokens, where most experts get none.
CASES = [(1, 1, 7, 24, 16), (8, 2, 7, 24, 16), (8, 2, 1, 24, 16), (8, 8, 7, 16, 8),
         (128, 8, 7, 32, 16), (8, 2, 4096, 16, 8), (128, 1, 1, 16, 8)]


def _weights(e, h, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    wgu = (torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5).to(dtype)
    wd = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(dtype)
    return wgu, wd


def _oracle(x, logits, wgu, wd, k, norm, dy):
    """float64 reference output and gradients (x, logits, w_gate_up, w_down)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, logits, wgu, wd)]
    y = reference.moe_experts(*leaves, k, norm)
    return y, torch.autograd.grad(y, leaves, dy.double())


@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "E{}-k{}-T{}-H{}-I{}".format(*c))
def test_moe_experts_matches_reference(device, backend, case, dtype):
    e, k, t, h, inter = case
    norm = CASES.index(case) % 2 == 0  # both settings across the cases
    torch.manual_seed(0)
    x = torch.randn(t, h).to(device, dtype).requires_grad_()
    logits = (2 * torch.randn(t, e)).to(device, dtype).requires_grad_()
    wgu, wd = (w.to(device).requires_grad_() for w in _weights(e, h, inter, dtype))
    with ops.use_backend(backend):
        y = ops.moe_experts(x, logits, wgu, wd, k, norm)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, logits, wgu, wd), dy)
    y64, grads64 = _oracle(x, logits, wgu, wd, k, norm, dy)
    assert y.dtype == dtype and y.shape == (t, h)
    # bf16 grads: one rounding per GEMM stage (4 stages) against the float64 oracle
    scale = 1 if dtype == torch.float32 else 2
    assert_close_to_oracle(y, y64, dtype, scale=scale, name="y")
    for name, got, want in zip(("dx", "d_logits", "d_w_gate_up", "d_w_down"), grads, grads64):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert_close_to_oracle(got, want, dtype, scale=4 * scale, name=name)


def _hf_block(e, k, h, inter, norm, dtype):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("HF 4.x sparse block API (experts as a module list)")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(hidden_size=h, num_experts=e, num_experts_per_tok=k,
                                      moe_intermediate_size=inter, norm_topk_prob=norm)
    torch.manual_seed(1)
    return Qwen3MoeSparseMoeBlock(cfg).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("case,norm", [((8, 2, 7, 24, 16), True), ((8, 2, 7, 24, 16), False),
                                       ((128, 8, 9, 32, 16), True), ((1, 1, 5, 16, 8), False),
                                       ((8, 8, 1, 16, 8), True)],
                         ids=lambda c: "E{}-k{}-T{}-H{}-I{}".format(*c) if isinstance(c, tuple)
                         else ("norm" if c else "nonorm"))
def test_model_block_matches_hf_sparse_block(case, norm, dtype):
    """Our model's sparse block (router + moe_experts) against HF's, same weights: output,
    router logits and the gradients of x, the router weight and both expert weights."""
    from qwen3_fast.model.config import Qwen3Config
    from qwen3_fast.model.moe import Qwen3SparseMoeBlock

    e, k, t, h, inter = case
    hf = _hf_block(e, k, h, inter, norm, dtype)
    cfg = Qwen3Config(vocab_size=8, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      model_type="qwen3_moe", num_experts=e, num_experts_per_tok=k,
                      moe_intermediate_size=inter, norm_topk_prob=norm)
    ours = Qwen3SparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(torch.stack(
            [torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in hf.experts]))
        ours.experts.down_proj.copy_(torch.stack([m.down_proj.weight for m in hf.experts]))
    x = torch.randn(1, t, h, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, logits_hf = hf(xa)
    y, logits = ours(xb)
    torch.testing.assert_close(logits, logits_hf, rtol=0, atol=0)
    dy = torch.randn_like(y)
    (y_hf * dy).sum().backward()
    (y * dy).sum().backward()
    hf_gu = torch.stack([torch.cat([m.gate_proj.weight.grad if m.gate_proj.weight.grad is not None
                                    else torch.zeros_like(m.gate_proj.weight),
                                    m.up_proj.weight.grad if m.up_proj.weight.grad is not None
                                    else torch.zeros_like(m.up_proj.weight)])
                         for m in hf.experts])
    hf_dn = torch.stack([m.down_proj.weight.grad if m.down_proj.weight.grad is not None
                         else torch.zeros_like(m.down_proj.weight) for m in hf.experts])
    # Both are dtype approximations of the same math: compare with twice the oracle tolerance
    # (bf16: HF adds the K expert outputs in bf16, we add them in fp32).
    scale = 2 if dtype == torch.float32 else 4
    for name, got, want in (("y", y, y_hf), ("dx", xb.grad, xa.grad),
                            ("d_gate", ours.gate.weight.grad, hf.gate.weight.grad),
                            ("d_w_gate_up", ours.experts.gate_up_proj.grad, hf_gu),
                            ("d_w_down", ours.experts.down_proj.grad, hf_dn)):
        assert_close_to_oracle(got, want.double(), dtype, scale=scale * (1 if name == "y" else 2),
                               name=name)


@pytest.mark.parametrize("device,backend", compiled_backends())
def test_experts_with_no_tokens_get_zero_grad(device, backend):
    e, k, t, h, inter = 8, 2, 5, 16, 8
    torch.manual_seed(0)
    x = torch.randn(t, h, device=device, requires_grad=True)
    logits = torch.randn(t, e, device=device)
    logits[:, 3:] -= 30  # only experts 0..2 can win
    logits.requires_grad_()
    wgu, wd = (w.to(device).requires_grad_() for w in _weights(e, h, inter, torch.float32))
    with ops.use_backend(backend):
        y = ops.moe_experts(x, logits, wgu, wd, k, True)
        y.sum().backward()
    assert torch.all(wgu.grad[3:] == 0) and torch.all(wd.grad[3:] == 0)
    assert wgu.grad[:3].abs().sum() > 0
    y_ref = reference.moe_experts(x.double(), logits.double(), wgu.double(), wd.double(), k, True)
    assert_close_to_oracle(y, y_ref, torch.float32, name="y")


def test_moe_experts_op_gradcheck_float64():
    """The fused op's hand-written backward (routing Jacobians included) in float64."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    wgu = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    op = torch.ops.qwen3_fast.moe_experts_fwd
    for norm in (True, False):
        assert torch.autograd.gradcheck(lambda *a: op(*a, 2, norm, "reference")[0],
                                        (x, logits, wgu, wd))


@pytest.mark.parametrize("norm", [True, False])
def test_moe_route_matches_reference_and_gradcheck(norm):
    torch.manual_seed(0)
    logits = torch.randn(9, 8, dtype=torch.bfloat16)
    w, ids, p = ops.moe_route(logits, 3, norm)
    w_r, ids_r, p_r = reference.moe_route(logits, 3, norm)
    assert torch.equal(ids, ids_r) and torch.equal(w, w_r) and torch.equal(p, p_r)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    l64 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    op = torch.ops.qwen3_fast.moe_route_fwd
    assert torch.autograd.gradcheck(lambda t: (op(t, 2, norm)[0], op(t, 2, norm)[2]), (l64,))
    # gradients through weights and probs (the aux-loss path) against autograd of the reference
    lg = torch.randn(7, 8, requires_grad=True)
    w, _, p = ops.moe_route(lg, 2, norm)
    (w.square().sum() + p.pow(3).sum()).backward()
    lr = lg.detach().clone().requires_grad_()
    w_r, _, p_r = reference.moe_route(lr, 2, norm)
    (w_r.square().sum() + p_r.pow(3).sum()).backward()
    torch.testing.assert_close(lg.grad, lr.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ permute / unpermute
@pytest.mark.parametrize("device,backend", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,e,h", [(1, 1, 1, 3), (7, 2, 8, 33), (50, 8, 128, 16), (0, 2, 4, 8)])
def test_permute_unpermute_match_reference(device, backend, dtype, t, k, e, h):
    torch.manual_seed(0)
    x = torch.randn(t, h).to(device, dtype).requires_grad_()
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else \
        torch.zeros(0, k, dtype=torch.int64)
    ids = ids.to(device)
    w = torch.rand(t, k, device=device, requires_grad=True)
    with ops.use_backend(backend):
        xs, offsets, row_map = ops.moe_permute(x, ids, e)
        y = ops.moe_unpermute(xs * 2, row_map, w)
    xs_r, off_r, rm_r = reference.moe_permute(x.detach(), ids, e)
    assert torch.equal(xs, xs_r) and torch.equal(offsets, off_r) and torch.equal(row_map, rm_r)
    y_r = reference.moe_unpermute(xs_r * 2, rm_r, w.detach())
    if dtype == torch.float32:  # the C++ kernel may fuse product and sum (FMA)
        torch.testing.assert_close(y, y_r, rtol=1e-6, atol=1e-6)
    else:  # each product rounded to the dtype, then the same float32 sum order: bit-exact
        assert torch.equal(y, y_r)
    if t == 0:
        return
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xl = x.detach().double().requires_grad_()
    wl = w.detach().double().requires_grad_()
    y64 = reference.moe_unpermute(reference.moe_permute(xl, ids, e)[0] * 2, rm_r, wl)
    dx64, dw64 = torch.autograd.grad(y64, (xl, wl), dy.double())
    assert_close_to_oracle(dx, dx64, dtype, name="dx")
    assert_close_to_oracle(dw, dw64, dtype, scale=2, name="dweights")


def test_permute_groups_by_expert_stably():
    ids = torch.tensor([[2, 0], [0, 2], [2, 1]])
    x = torch.arange(3.0).unsqueeze(1)
    xs, offsets, row_map = ops.moe_permute(x, ids, 4)
    assert offsets.tolist() == [0, 2, 3, 6, 6]  # expert 3 has no tokens
    assert xs.flatten().tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    assert row_map.tolist() == [3, 0, 1, 4, 5, 2]


def test_opcheck_custom_ops():
    torch.manual_seed(0)
    x = torch.randn(5, 8, requires_grad=True)
    logits = torch.randn(5, 4, requires_grad=True)
    wgu = torch.randn(4, 6, 8, requires_grad=True)
    wd = torch.randn(4, 8, 3, requires_grad=True)
    q = torch.ops.qwen3_fast
    torch.library.opcheck(q.moe_experts_fwd.default, (x, logits, wgu, wd, 2, True, "cpu"))
    ids = torch.randint(0, 4, (5, 2))
    xs, _, rm = q.moe_permute_fwd(x.detach(), ids, 4, "cpu")
    torch.library.opcheck(q.moe_unpermute_fwd.default,
                          (xs.requires_grad_(), rm, torch.rand(10, requires_grad=True), 2, "cpu"))


def test_compile_fullgraph_block_forward_backward():
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    gate = torch.randn(4, 8, requires_grad=True)
    wgu = torch.randn(4, 6, 8, requires_grad=True)
    wd = torch.randn(4, 8, 3, requires_grad=True)

    def f(x, gate, wgu, wd):
        return ops.moe_experts(x, x @ gate.t(), wgu, wd, 2, True)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, gate, wgu, wd)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, gate, wgu, wd)]
    for t in (x, gate, wgu, wd):
        t.grad = None
    y_eager = f(x, gate, wgu, wd)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, t in zip(grads, (x, gate, wgu, wd)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: ops.moe_experts(torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 6, 4),
                             torch.randn(4, 4, 3), 2, True), ValueError, "router_logits has shape"),
    (lambda: ops.moe_experts(torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 6, 4),
                             torch.randn(4, 4, 3).double(), 2, True), TypeError, "w_down has dtype"),
    (lambda: ops.moe_experts(torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 6, 4),
                             torch.randn(4, 4, 3), 5, True), ValueError, "top_k must be"),
    (lambda: ops.moe_experts(torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 5, 4),
                             torch.randn(4, 4, 3), 2, True), ValueError, "w_gate_up has shape"),
    (lambda: ops.moe_permute(torch.randn(3, 4), torch.tensor([[0], [4], [1]]), 4),
     ValueError, r"expert_ids has values in \[0, 4\]"),
    (lambda: ops.moe_permute(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.int32), 4),
     TypeError, "expert_ids has dtype"),
    (lambda: ops.moe_permute(torch.randn(3, 4), torch.zeros(2, 1, dtype=torch.int64), 4),
     ValueError, "expert_ids has 2 rows"),
    (lambda: ops.moe_unpermute(torch.randn(6, 4), torch.arange(5), torch.rand(3, 2)),
     ValueError, "row_map has 5 entries"),
])
def test_bad_inputs_are_named(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def test_cpu_kernel_rejects_out_of_range_row_map():
    from qwen3_fast import _ext

    if not _ext.available():
        pytest.skip("_C not built")
    with ops.use_backend("cpu"), pytest.raises(ValueError, match=r"row_map\[1\] = 9"):
        ops.moe_unpermute(torch.randn(4, 3), torch.tensor([0, 9, 2, 3]), torch.rand(2, 2))
