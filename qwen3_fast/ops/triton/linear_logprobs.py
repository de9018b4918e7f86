"""Log-softmax rows of one logits chunk in Triton, for ops/linear_logprobs.py.

The fused linear log-probs op keeps the GEMMs of a chunk (``z = h @ W.T`` and the gradient
GEMMs) in torch; these kernels do the row work between them, streaming over the
vocabulary BLOCK columns at a time so a row is never held whole:

* forward (``logprob_rows``): per row, pass 1 the online max / sum of exp of
  ``s = z / temperature`` for the log-sum-exp, pass 2 ``H = -sum p * log p`` with
  ``log p = s - lse`` (a second pass rather than an online entropy: the shifted sum needs
  no rescaling and stays exact for near-one-hot rows), then the target's ``log p``.
* backward (``logprob_grad_rows_``): one pass that overwrites a [rows, vocabulary slice]
  tile of logits IN PLACE with the gradient
  ``d/dz = (gl * (onehot(target) - p) - ge * p * (log p + H)) / temperature`` from the
  saved lse and H and the upstream gradients gl (log-probs) and ge (entropy): every entry
  is local given lse and H, so the backward may tile the vocabulary.

Run on the CPU: ``TRITON_INTERPRET=1 pytest python_tests/ops/test_linear_logprobs.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _logprob_rows_kernel(logits_ptr, row_stride, targets_ptr, logprob_ptr, entropy_ptr,
                         lse_ptr, n_cols, temperature, ignore_index, BLOCK: tl.constexpr):
    """Row r of s = z / temperature: lse[r]; logprob[r] = s[target] - lse and entropy[r]
    (both 0 when the target is ignore_index)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        x = x / temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    ent = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
        logp = x / temperature - lse
        ent -= tl.sum(tl.where(mask, tl.exp(logp) * logp, 0.0), axis=0)
    target_logp = tl.load(base + safe_target).to(tl.float32) / temperature - lse
    tl.store(lse_ptr + row, lse)
    tl.store(logprob_ptr + row, tl.where(valid, target_logp, 0.0))
    tl.store(entropy_ptr + row, tl.where(valid, ent, 0.0))


@triton.jit
def _logprob_grad_rows_kernel(logits_ptr, row_stride, tcol_ptr, col_offset, lse_ptr,
                              entropy_ptr, grad_lp_ptr, grad_ent_ptr, n_cols, temperature,
                              BLOCK: tl.constexpr):
    """Row r of a tile whose first column is vocabulary entry col_offset:
    z[r, :] <- (gl * (onehot - p) - ge * p * (log p + H)) / temperature."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(tcol_ptr + row).to(tl.int64) - col_offset  # -1 - offset: no target
    lse = tl.load(lse_ptr + row).to(tl.float32)
    ent = tl.load(entropy_ptr + row).to(tl.float32)
    gl = tl.load(grad_lp_ptr + row).to(tl.float32)
    ge = tl.load(grad_ent_ptr + row).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        mask = idx < n_cols
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        logp = x / temperature - lse
        p = tl.exp(logp)
        g = gl * (tl.where(idx == target, 1.0, 0.0) - p) - ge * p * (logp + ent)
        tl.store(base + idx, g / temperature, mask=mask)


def _launch(cols: int) -> tuple[int, int]:
    block = min(4096, max(16, triton.next_power_of_2(cols)))
    return block, (8 if block >= 2048 else 4)


def logprob_rows(logits: Tensor, targets: Tensor, temperature: float,
                 ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row log-prob of the target, entropy and log-sum-exp of ``logits / temperature``.

    Parameters
    ----------
    logits : Tensor, shape [C, V], float32, unit column stride (not modified)
    targets : Tensor, shape [C], int64, in [0, V) or ignore_index
    temperature : float > 0
    ignore_index : int

    Returns
    -------
    (logprobs, entropy, lse) : Tensors, shape [C], float32; logprobs and entropy are 0 on
    rows whose target is ignore_index.
    """
    rows, cols = logits.shape
    out = torch.empty((3, rows), dtype=torch.float32, device=logits.device)
    if rows:
        block, warps = _launch(cols)
        # a true division by the temperature, rounded as the torch path's z / temperature
        _logprob_rows_kernel[(rows,)](logits, logits.stride(0), targets, out[0], out[1], out[2],
                                      cols, float(temperature), int(ignore_index), BLOCK=block,
                                      num_warps=warps)
    return out[0], out[1], out[2]


def logprob_grad_rows_(logits: Tensor, target_cols: Tensor, col_offset: int, lse: Tensor,
                       entropy: Tensor, grad_logprobs: Tensor, grad_entropy: Tensor,
                       temperature: float) -> Tensor:
    """Overwrite a logits tile with the gradient of ``sum(gl * logprobs + ge * entropy)``.

    Parameters
    ----------
    logits : Tensor, shape [C, Vs], float32, unit column stride: the logits z of vocabulary
        entries [col_offset, col_offset + Vs) (not yet divided by the temperature);
        overwritten with d/dz
    target_cols : Tensor, shape [C], int64: each row's target, or -1 for a row that has
        none (ignored rows; their gl and ge are 0)
    col_offset : int, the vocabulary entry of the tile's first column
    lse, entropy : Tensor, shape [C], float32, from :func:`logprob_rows`
    grad_logprobs, grad_entropy : Tensor, shape [C], float32, the upstream gradients, already
        0 on ignored rows
    temperature : float > 0

    Returns
    -------
    logits (the same tensor).
    """
    rows, cols = logits.shape
    if rows:
        block, warps = _launch(cols)
        _logprob_grad_rows_kernel[(rows,)](logits, logits.stride(0), target_cols,
                                           int(col_offset), lse.contiguous(),
                                           entropy.contiguous(), grad_logprobs.contiguous(),
                                           grad_entropy.contiguous(), cols, float(temperature),
                                           BLOCK=block, num_warps=warps)
    return logits
