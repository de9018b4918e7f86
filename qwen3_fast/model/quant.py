"""Group-wise int4 weight-only linear layers for the self-speculative draft (QuantSpec).

The draft model of self-speculative decoding may read 4-bit copies of the MLP weights while
the target keeps the 16-bit ones. The matrix products use torch's int4 weight-only kernels
(``aten._weight_int4pack_mm_for_cpu`` on the CPU, ``aten._weight_int4pack_mm`` on CUDA, the
kernels behind torchao's int4 weight-only path), so nothing here multiplies by hand.

Quantization: per output row, groups of ``group_size`` input columns, asymmetric:
``s = (max - min) / 15``, ``q = round((w - min) / s)`` in [0, 15], ``w ~ q * s + min``.
torch's kernels take ``w = (q - 8) * scale + zero``, so ``zero = min + 8 * s``.
Limits of those kernels: group_size in {32, 64, 128, 256}, in_features a multiple of it,
out_features a multiple of 16 (CPU) and bf16 activations on CUDA.

    attach_draft_weights(model, group_size=128)   # int4 copies of every dense MLP
    with draft_weights(model):                    # forward passes here use them
        logits = model(ids, cache=cache, precision=4).logits
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

GROUP_SIZES = (32, 64, 128, 256)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """weight [N, K] -> (q [N, K] int32 in [0, 15], scale [N, K/G] fp32, min [N, K/G] fp32)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=-1)
    hi = w.amax(dim=-1)
    # constant groups get scale 1 (q = 0 everywhere, exact)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    q = torch.round((w - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo


def dequantize_int4(q: Tensor, scale: Tensor, lo: Tensor) -> Tensor:
    """The fp32 weight the int4 kernels multiply by: q * s + min per group (the oracle)."""
    n, k = q.shape
    g = k // scale.shape[1]
    return (q.float().reshape(n, -1, g) * scale.unsqueeze(-1) + lo.unsqueeze(-1)).reshape(n, k)


class Int4Linear(nn.Module):
    """y = x @ W^T with W held as group-wise int4 (no bias; Qwen3's MLPs have none).

    Parameters
    ----------
    weight : [out_features, in_features] float weight to quantize.
    group_size : one of 32, 64, 128, 256 dividing in_features.
    """

    def __init__(self, weight: Tensor, group_size: int = 128):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out_features, in_features], got {tuple(weight.shape)}")
        n, k = weight.shape
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} (torch's int4 kernels), "
                             f"got {group_size!r}")
        if k % group_size:
            raise ValueError(f"in_features ({k}) must be a multiple of group_size ({group_size})")
        if n % 16:
            raise ValueError(f"out_features ({n}) must be a multiple of 16 (torch's int4 kernels)")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.act_dtype = weight.dtype if weight.is_floating_point() else torch.bfloat16
        q, scale, lo = quantize_int4(weight, group_size)
        zero = lo + 8 * scale
        # [K/G, N, 2]: (scale, zero) per group and output row, the layout the kernels take
        sz = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(self.act_dtype)
        if weight.is_cuda:
            # two nibbles per byte (even column in the high nibble), then the tensor-core
            # tile layout; inner_k_tiles 8 is what torchao uses for K >= 1024
            packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
            inner = 8 if k % 1024 == 0 else (4 if k % 512 == 0 else 2)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", sz, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features; expected {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.act_dtype:
            x2 = x2.to(self.act_dtype)
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.packed, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed,
                                                           self.group_size, self.scales_and_zeros)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        return (self.packed.numel() * self.packed.element_size()
                + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size())


def draft_group_size(model: nn.Module, preferred: int = 128) -> int:
    """The largest int4 group size <= `preferred` (from GROUP_SIZES) that divides the input
    width of every dense MLP projection of `model` (hidden and intermediate sizes)."""
    from qwen3_fast.model.layers import Qwen3MLP

    widths = {w for m in model.modules() if isinstance(m, Qwen3MLP)
              for w in (m.gate_proj.in_features, m.down_proj.in_features)}
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= preferred and all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"no int4 group size in {GROUP_SIZES} (<= {preferred}) divides the MLP "
                     f"widths {sorted(widths)}")


def attach_draft_weights(model: nn.Module, group_size: int = 128) -> int:
    """Give every dense MLP of `model` int4 copies of its projections; returns their bytes.

    gate_proj and up_proj become one int4 matrix [2I, H] (one kernel call), down_proj
    [H, I]. MoE expert weights are not quantized (raises: the draft of an MoE model reads
    16-bit expert weights; pass draft_weight_bits=16).
    """
    from qwen3_fast.model.layers import Qwen3MLP
    from qwen3_fast.model.moe import Qwen3SparseMoeBlock

    if any(isinstance(m, Qwen3SparseMoeBlock) for m in model.modules()):
        raise ValueError("draft_weight_bits=4 quantizes dense MLPs only; this model has MoE "
                         "layers, use draft_weight_bits=16")
    total = 0
    for mlp in model.modules():
        if isinstance(mlp, Qwen3MLP):
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
            mlp.draft_gate_up = Int4Linear(gate_up, group_size)
            mlp.draft_down = Int4Linear(mlp.down_proj.weight, group_size)
            total += mlp.draft_gate_up.nbytes() + mlp.draft_down.nbytes()
    return total


@contextmanager
def draft_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, dense MLPs that have int4 draft copies use them."""
    from qwen3_fast.model.layers import Qwen3MLP

    mlps = [m for m in model.modules() if isinstance(m, Qwen3MLP) and m.draft_gate_up is not None]
    for m in mlps:
        m.use_draft = True
    try:
        yield
    finally:
        for m in mlps:
            m.use_draft = False


__all__ = ["GROUP_SIZES", "Int4Linear", "attach_draft_weights", "dequantize_int4",
           "draft_group_size",
           "draft_weights", "quantize_int4"]
