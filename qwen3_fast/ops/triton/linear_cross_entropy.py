"""Cross-entropy over one chunk of logits in Triton, for ops/linear_cross_entropy.py.

The fused linear cross-entropy keeps the two GEMMs of a chunk (``logits = h @ W.T`` and the
gradient GEMMs) in torch (cuBLAS is already at the hardware limit there); this kernel does
the part between them that the unfused path spends its memory on: per row, one streaming
pass over the vocabulary for the log-sum-exp (online max/sum, so a row is never held whole)
and the target logit, then a second pass that overwrites the logits IN PLACE with the
gradient ``(softmax - onehot(label)) * scale``. So a chunk needs one [C, V] fp32 buffer for
logits and gradient together.

Run on the CPU: ``TRITON_INTERPRET=1 pytest python_tests/ops/test_linear_cross_entropy.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _ce_rows_kernel(logits_ptr, row_stride, labels_ptr, loss_ptr, scale_ptr, n_cols,
                    ignore_index, BLOCK: tl.constexpr):
    """Row r: loss[r] = lse - x[label] (0 when ignored);
    x[r, :] <- (exp(x - lse) - onehot(label)) * scale (0 when ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    scale = tl.load(scale_ptr).to(tl.float32)
    row_scale = tl.where(valid, scale, 0.0)
    cols = tl.arange(0, BLOCK)
    # pass 1: online max and sum of exp over the vocabulary, BLOCK columns at a time
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(base + safe_label).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    # pass 2: the gradient, written over the logits
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        mask = idx < n_cols
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(idx == safe_label, 1.0, 0.0)
        tl.store(base + idx, g * row_scale, mask=mask)


def ce_rows_(logits: Tensor, labels: Tensor, scale: Tensor, ignore_index: int) -> Tensor:
    """Per-row CE of a logits chunk and its gradient, in place.

    Parameters
    ----------
    logits : Tensor, shape [C, V], float32, unit column stride; overwritten with
        ``(softmax - onehot) * scale`` (rows whose label is ignore_index become 0)
    labels : Tensor, shape [C], int64, in [0, V) or ignore_index
    scale : Tensor, shape [1], float32: the gradient multiplier (1/N for a mean, 1 for a sum)
    ignore_index : int

    Returns
    -------
    Tensor, shape [C], float32: lse - logit[label] per row (0 for ignored rows), unscaled.
    """
    rows, cols = logits.shape
    loss = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(4096, max(16, triton.next_power_of_2(cols)))
    num_warps = 8 if block >= 2048 else 4
    _ce_rows_kernel[(rows,)](logits, logits.stride(0), labels, loss, scale, cols,
                             int(ignore_index), BLOCK=block, num_warps=num_warps)
    return loss
