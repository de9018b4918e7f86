"""Global-batch load-balancing loss: counts, frequencies (all-reduced over a gloo group of
two processes), and the loss against HF's load_balancing_loss_func and the formula.

    pytest python_tests/ops/test_moe_load_balancing.py        # about 10 s on 2 CPU cores
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from qwen3_fast import ops

E, K = 8, 2


def _layers(seed, rows=10, layers=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, E, generator=g).requires_grad_() for _ in range(layers))


@pytest.mark.parametrize("masked", [False, True])
def test_one_micro_batch_one_rank_equals_hf(masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    layers = _layers(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]) if masked else None
    counts = ops.expert_selection_counts(layers, E, K, mask)
    assert counts.shape == (E + 1,) and counts.dtype == torch.float64
    assert counts[E] == 3 * (8 if masked else 10) and counts[:E].sum() == K * counts[E]
    f = ops.global_expert_frequencies(counts)
    loss = ops.global_load_balancing_loss(layers, f, mask)
    ref = load_balancing_loss_func(layers, E, K, mask)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(loss, ops.load_balancing_loss(layers, E, K, mask))
    # same gradient as HF's loss w.r.t. every layer's logits (f carries none)
    g = torch.autograd.grad(loss, layers)
    g_ref = torch.autograd.grad(load_balancing_loss_func(layers, E, K, mask), layers)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_two_micro_batches_follow_the_formula():
    mb = [_layers(1, rows=6), _layers(2, rows=9)]
    counts = [ops.expert_selection_counts(m, E, K) for m in mb]
    f = ops.global_expert_frequencies(counts)
    # f_e by hand: selections of e over both micro-batches / all (layer, token) rows
    sel = torch.zeros(E)
    rows = 0
    for m in mb:
        for logits in m:
            ids = torch.topk(torch.softmax(logits.detach(), -1), K, -1).indices
            sel += torch.bincount(ids.flatten(), minlength=E).float()
            rows += logits.shape[0]
    torch.testing.assert_close(f, sel / rows)
    torch.testing.assert_close(f.sum(), torch.tensor(float(K)))
    for m in mb:  # P_e is local to each micro-batch and differentiable
        p = torch.softmax(torch.cat(m), -1).mean(0)
        loss = ops.global_load_balancing_loss(m, f)
        torch.testing.assert_close(loss, E * (f * p).sum())
        (g,) = torch.autograd.grad(loss, m[0])
        (g_ref,) = torch.autograd.grad(E * (f * torch.softmax(torch.cat(m), -1).mean(0)).sum(), m[0])
        torch.testing.assert_close(g, g_ref)


_RANK_MAIN = """
import sys, torch, torch.distributed as dist
from qwen3_fast import ops
rank, port = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
g = torch.Generator().manual_seed(10 + rank)
layers = tuple(torch.randn(10, 8, generator=g) for _ in range(3))
f = ops.global_expert_frequencies(ops.expert_selection_counts(layers, 8, 2))
print(" ".join(repr(v) for v in f.tolist()))
dist.destroy_process_group()
"""


def test_frequencies_all_reduce_over_two_ranks():
    """Two gloo ranks (separate processes) each count their own batch; both must get the
    frequencies of the two batches together."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_MAIN, str(r), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(torch.tensor([float(v) for v in out.split()]))
    both = [ops.expert_selection_counts(_layers(10 + r), E, K) for r in range(2)]
    expected = ops.global_expert_frequencies(both)  # one process, both ranks' counts summed
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], expected)
    assert not torch.allclose(expected, ops.global_expert_frequencies(both[0]))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="non-empty sequence"):
        ops.global_expert_frequencies([])
    with pytest.raises(ValueError, match="has 8 experts; expected num_experts=6"):
        ops.expert_selection_counts(_layers(0), 6, K)
    with pytest.raises(ValueError, match="has 8 experts; expected num_experts=4"):
        ops.global_load_balancing_loss(_layers(0), torch.ones(4))
    with pytest.raises(ValueError, match="top_k"):
        ops.expert_selection_counts(_layers(0), E, 9)
