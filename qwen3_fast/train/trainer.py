"""The trainer core every pre-training stage runs: :func:`train` (a config in, losses out).

One optimizer step = ``grad_accum`` micro-steps of ``micro_batch_size`` packed rows on each
of ``world`` ranks. The loss is the cross-entropy SUM over the global batch divided by the
global number of predicted tokens (token-level normalization), so the step is the same
whatever the split into ranks and micro-steps: each micro-step back-propagates
``ce_sum * world / N`` (FSDP's reduce-scatter averages over ranks; the factor undoes that).
The LM head + CE is fused (ops.linear_cross_entropy), so no [T, V] logits exist.

Per step: lr from the schedule (train/optim.py), bf16 autocast (CPU and CUDA) or fp32,
gradient clipping on the global norm, AdamW, metrics (JSONL, TensorBoard when installed,
a tqdm line with loss, lr and tokens/s) and, every ``save_every`` steps, an atomic
checkpoint (train/checkpoint.py) that :func:`train` resumes from exactly.
Activation checkpointing: each decoder layer's forward is recomputed in the backward
(torch.utils.checkpoint, non-reentrant).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Optional

import torch
from torch import nn

from qwen3_fast.train import losses
from qwen3_fast.train.config import TrainConfig
from qwen3_fast.train.data import collate, global_batch, load_tokenizer
from qwen3_fast.train.distributed import (DistEnv, all_reduce_sum, init_distributed,
                                          shard_model)
from qwen3_fast.train.loop import run_steps
from qwen3_fast.train.optim import build_optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The stage's model: from ``model.init_from`` (a previous stage) or a fresh init of
    ``model.name``, with the stage's and the user's Qwen3Config overrides applied."""
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config

    overrides = {**cfg.stage_model_overrides(), **cfg.model.overrides}
    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.init_from:
        base = Qwen3ForCausalLM.from_pretrained(cfg.model.init_from, dtype=dtype, device=device)
        if not overrides:
            return base
        config = dataclasses.replace(base.config, **overrides)
        model = Qwen3ForCausalLM(config, init_weights=False).to(device=device, dtype=dtype)
        model.load_state_dict(base.state_dict())
        return model
    if not cfg.model.name:
        raise ValueError("model: expected model.name (a preset) or model.init_from (a path)")
    config = Qwen3Config.from_name(cfg.model.name, **overrides)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(dtype=dtype)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


class Metrics:
    """metrics.jsonl (appended on resume), TensorBoard when installed, on rank 0 only."""

    def __init__(self, output_dir: str, env: DistEnv):
        self.file = None
        self.tb = None
        if not env.is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _device_batch(rows: list[dict], device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in collate(rows).items()}


def train(cfg: TrainConfig, env: Optional[DistEnv] = None) -> list[float]:
    """Run (or resume) the configured training; returns this run's per-step losses."""
    cfg.validate()
    env = env or init_distributed(cfg.device)
    seed_everything(cfg.seed)  # the same init on every rank, before sharding
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, env.device)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if env.distributed:
        shard_model(model)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, env.device, env.distributed)
    stream = cfg.build_stream(tokenizer)
    is_moe = model.config.is_moe
    aux_coef = cfg.moe_aux_coef if cfg.moe_aux_coef is not None else \
        model.config.router_aux_loss_coef
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16")
    balance = losses.MoeBalance(cfg.moe_balance, model.config) if is_moe else None
    rows_per_rank = cfg.micro_batch_size * cfg.grad_accum
    tokens_per_step = rows_per_rank * env.world * cfg.data.seq_len

    def step_fn(step: int) -> tuple[float, dict]:
        rows, n_targets = global_batch(stream, rows_per_rank, env.rank, env.world)
        norm = env.world / max(n_targets, 1)
        ce_sum = torch.zeros((), dtype=torch.float32, device=env.device)
        if balance is not None:
            balance.start_step()
        for i in range(cfg.grad_accum):
            batch = _device_batch(rows[i * cfg.micro_batch_size:
                                       (i + 1) * cfg.micro_batch_size], env.device)
            if env.distributed:  # reduce-scatter once per step, after the last micro
                model.set_requires_gradient_sync(i == cfg.grad_accum - 1)
            with autocast:
                out = model(batch["input_ids"], position_ids=batch["position_ids"],
                            document_ids=batch["document_ids"], labels=batch["labels"],
                            return_logits=False, loss_reduction="sum",
                            output_router_logits=is_moe)
            loss = out.loss * norm
            if balance is not None and aux_coef:
                # mean over micro-steps and (through FSDP's average) over ranks
                loss = loss + aux_coef * balance(out) / cfg.grad_accum
            loss.backward()
            ce_sum += out.loss.detach().float()
        step_loss = (all_reduce_sum(ce_sum, env) / max(n_targets, 1)).item()
        return step_loss, {"tokens": tokens_per_step, "targets": n_targets}

    return run_steps(cfg, env, model, optimizer, tokenizer, stream, step_fn,
                     desc=f"train {cfg.stage}")


__all__ = ["build_model", "enable_activation_checkpointing", "seed_everything", "train"]
