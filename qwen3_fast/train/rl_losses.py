"""GRPO losses as pure tensor functions (REFERENCES.md "Training formulas").

Shapes: ``B`` sequences (prompt + completion, right-padded to ``S``); per-token tensors are
``[B, S]`` aligned with the model's next-token predictions (position t scores token t+1) and
``mask [B, S]`` (bool or 0/1) is true exactly on the completion tokens being scored, so
prompt and padding positions never carry loss. Advantages are one value per sequence [B].

Pieces:
- :func:`group_advantages`: A_i = (r_i - mean_group) / (std + 1e-4), std per group ("group"),
  over the whole batch ("batch", the group mean is still subtracted) or no scaling ("none",
  Dr. GRPO);
- :func:`clipped_policy_loss`: -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) with
  the clip fractions at each bound;
- :func:`k3_kl`: exp(ref - logp) - (ref - logp) - 1, an unbiased non-negative KL estimate;
- :func:`aggregate`: the token-level normalizations grpo / bnpo / dr_grpo / dapo, written so
  that summing the micro-batch values of one optimizer step gives the full-batch value;
- :class:`EntropyController`: Skywork-OR1's adaptive entropy coefficient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ADVANTAGE_MODES = ("group", "batch", "none")
NORMALIZATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4


def group_advantages(rewards: Tensor, group_size: int, mode: str = "group") -> Tensor:
    """Per-completion advantages from rewards of consecutive groups of `group_size`.

    Parameters
    ----------
    rewards : [B] float, B = prompts * group_size, the completions of one prompt adjacent
    group_size : G >= 2 (completions per prompt)
    mode : "group" (r - mean_g) / (std_g + 1e-4); "batch" (r - mean_g) / (std_batch + 1e-4);
        "none" r - mean_g. std is the unbiased (n - 1) standard deviation.

    Returns
    -------
    [B] float32 advantages (0 for a group whose rewards are all equal)
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode: expected one of {ADVANTAGE_MODES}, got {mode!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor [B], got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size: expected an int >= 2 dividing {rewards.numel()}, got "
                         f"{group_size}")
    r = rewards.float().view(-1, group_size)  # [P, G]
    centered = r - r.mean(dim=1, keepdim=True)
    if mode == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + STD_EPS)
    elif mode == "batch":
        centered = centered / (r.std() + STD_EPS)
    return centered.reshape(-1)


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                        eps_low: float = 0.2, eps_high: float = 0.2
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The clipped-ratio surrogate per token (PPO / GRPO, DAPO's separate upper bound).

    Parameters
    ----------
    logp : [B, S] log-probs of the sampled tokens under the policy being optimized
    old_logp : [B, S] the same under the policy that sampled them (no gradient)
    advantages : [B] (one per sequence) or [B, S]
    eps_low, eps_high : the ratio is clipped to [1 - eps_low, 1 + eps_high]

    Returns
    -------
    loss : [B, S] -min(ratio A, clip(ratio) A) (mask it with :func:`aggregate`)
    clipped_low : [B, S] bool, ratio < 1 - eps_low with A < 0 (the clip removes the gradient)
    clipped_high : [B, S] bool, ratio > 1 + eps_high with A > 0
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (advantages < 0)
        high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return loss, low, high


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimate of KL(policy || reference) per token: exp(d) - d - 1 with d = ref - logp.

    Parameters
    ----------
    logp, ref_logp : [B, S] log-probs of the sampled tokens (policy, frozen reference)

    Returns
    -------
    [B, S] >= 0
    """
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1.0


def aggregate(values: Tensor, mask: Tensor, normalization: str, *,
              num_sequences: Optional[int] = None, num_tokens: Optional[int] = None,
              max_completion_length: Optional[int] = None,
              num_micro_batches: int = 1) -> Tensor:
    """Reduce per-token values to this micro-batch's share of the step's scalar loss.

    Parameters
    ----------
    values : [B, S] per-token loss terms
    mask : [B, S] true on the completion tokens that count
    normalization :
        "grpo": mean over each sequence's tokens, then mean over the step's sequences;
        "bnpo": sum / active tokens of this (local) micro-batch, averaged over micro-batches;
        "dr_grpo": sum / (sequences of the step * max_completion_length);
        "dapo": sum / active tokens of the step's whole (global) batch.
    num_sequences : sequences in the optimizer step (default: B, a one-micro-batch step)
    num_tokens : active tokens in the step (dapo; default: this mask's count)
    max_completion_length : dr_grpo's constant (default: S)
    num_micro_batches : micro-batches in the step (bnpo averages over them)

    Returns
    -------
    scalar: summed over the micro-batches of a step, it is the step's normalized loss
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got "
                         f"{normalization!r}")
    if values.shape != mask.shape:
        raise ValueError(f"mask: expected the shape of values {tuple(values.shape)}, got "
                         f"{tuple(mask.shape)}")
    m = mask.to(values.dtype)
    masked = values * m  # multiply (not index) so masked positions get exactly zero gradient
    b, s = values.shape
    if normalization == "grpo":
        per_seq = masked.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return per_seq.sum() / (num_sequences or b)
    if normalization == "bnpo":
        return masked.sum() / m.sum().clamp(min=1.0) / num_micro_batches
    if normalization == "dr_grpo":
        return masked.sum() / ((num_sequences or b) * (max_completion_length or s))
    total = num_tokens if num_tokens is not None else int(m.sum().item())
    return masked.sum() / max(total, 1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` [B, S] over the true positions of `mask` (0 when none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


class EntropyController:
    """Skywork-OR1 adaptive entropy coefficient.

    At step k with mean entropy H_k (nats per token of the rollout batch): the bonus
    coefficient is alpha_k = c_k if H_k < target else 0 (loss = L_pg - alpha_k H), and
    c_{k+1} = clip(c_k + delta if H_k < target else c_k - delta, c_min, c_max). So the bonus
    grows while entropy sits under the target and fades (and switches off) above it.

    Parameters
    ----------
    target : H_target in nats (0.2 in the paper)
    delta : step of the coefficient (0.005 in the paper's examples)
    init : c_0
    c_min, c_max : bounds of c
    """

    def __init__(self, target: float = 0.2, delta: float = 0.005, init: float = 0.0,
                 c_min: float = 0.0, c_max: float = 0.05):
        if not 0 <= c_min <= c_max:
            raise ValueError(f"c_min, c_max: expected 0 <= c_min <= c_max, got {c_min}, {c_max}")
        if delta < 0:
            raise ValueError(f"delta: expected >= 0, got {delta}")
        self.target, self.delta, self.c_min, self.c_max = target, delta, c_min, c_max
        self.coef = min(max(init, c_min), c_max)

    def alpha(self, entropy: float) -> float:
        """alpha_k for the current c_k and the batch entropy H_k."""
        return self.coef if entropy < self.target else 0.0

    def update(self, entropy: float) -> float:
        """Move c_k to c_{k+1} after a step whose entropy was `entropy`; returns c_{k+1}."""
        step = self.delta if entropy < self.target else -self.delta
        self.coef = min(max(self.coef + step, self.c_min), self.c_max)
        return self.coef

    def step(self, entropy: float) -> float:
        """alpha_k, then the update to c_{k+1} (one call per optimizer step)."""
        a = self.alpha(entropy)
        self.update(entropy)
        return a

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


__all__ = ["ADVANTAGE_MODES", "EntropyController", "NORMALIZATIONS", "aggregate",
           "clipped_policy_loss", "group_advantages", "k3_kl", "masked_mean"]
