"""AdamW and the learning-rate schedules (linear warmup + cosine, warmup-stable-decay).

The schedule is a pure function of the step, so resuming needs only the step number (saved
with every checkpoint); no scheduler object carries hidden state. AdamW uses torch's fused
implementation where the device has one (CUDA; CPU since torch 2.4) and the foreach one
otherwise; weight decay skips norms and other 1-D parameters, as is standard for LLMs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qwen3_fast.train.config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`.

    cosine: linear warmup from lr/warmup to lr over ``warmup_steps``, then half a cosine
    down to ``lr * min_lr_ratio`` at the last step.
    wsd: the same warmup, constant lr, then a linear decay to ``lr * min_lr_ratio`` over the
    last ``decay_fraction`` of the steps (warmup-stable-decay).
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warm = cfg.warmup_steps
    if warm > 0 and step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "cosine":
        span = max(1, total_steps - 1 - warm)
        progress = min(1.0, max(0.0, (step - warm) / span))
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(total_steps * cfg.decay_fraction)))
        decay_start = max(warm, total_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return peak + (floor - peak) * progress
    raise ValueError(f"schedule must be 'cosine' or 'wsd', got {cfg.schedule!r}")


def _fused_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        return (major, minor) >= (2, 4)
    return False


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    distributed: bool = False) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters: decay on >= 2-D tensors only.

    Fused on CUDA and (single-process) CPU; foreach for FSDP on the CPU, where the fused
    kernel would see DTensor shards (torch's fused CPU AdamW does not take DTensors)."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = _fused_supported(device) and not (distributed and device.type == "cpu")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["build_optimizer", "lr_at", "set_lr"]
