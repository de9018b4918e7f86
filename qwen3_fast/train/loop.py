"""The optimizer-step loop every gradient-based recipe shares (pre-training, SFT,
distillation): resume, lr schedule, clipping, AdamW step, metrics, progress line,
atomic checkpoints and the finished model.

The recipe supplies ``step_fn(step) -> (loss, extra)``: one optimizer step's forward and
backward (micro-steps, gradient accumulation, the loss normalization), returning the step's
loss as a float and extra metrics. When ``extra`` has ``tokens``, the record also gets
``tok_per_s``. GRPO keeps its own loop (grpo_step.py): one of its steps makes several
optimizer steps (PPO epochs) and checkpoints extra state (the entropy controller).
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

from qwen3_fast.train.checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint,
                                         save_hf_model)
from qwen3_fast.train.config import to_dict
from qwen3_fast.train.optim import lr_at, set_lr


def run_steps(cfg, env, model, optimizer, tokenizer, data,
              step_fn: Callable[[int], tuple[float, dict]], desc: str) -> list[float]:
    """Run (or resume) steps ``[start, min(steps, stop_after))``; returns their losses.

    Parameters
    ----------
    cfg : a TrainConfig (steps, stop_after, optim, output_dir, save_every, log_every, ...)
    env : the DistEnv; model / optimizer : possibly FSDP-sharded
    tokenizer : saved next to the finished model (``<output_dir>/model``)
    data : the data position, with ``state_dict()`` / ``load_state_dict()``; saved in every
        checkpoint and restored on resume
    step_fn : one optimizer step's forward + backward (see the module docstring)
    desc : the progress line's label
    """
    from qwen3_fast.train.trainer import Metrics

    start = 0
    ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, env)
        data.load_state_dict(state["data"])
        start = state["step"]
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    metrics = Metrics(cfg.output_dir, env)
    bar = None
    if cfg.progress and env.is_main and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step")
    out: list[float] = []
    last_saved = start
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.steps, cfg.optim)
            set_lr(optimizer, lr)
            loss, extra = step_fn(step)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the ranks
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.append(loss)
            dt = time.perf_counter() - t0
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                      **extra, "time": dt}
            if "tokens" in extra:
                record["tok_per_s"] = extra["tokens"] / dt
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                metrics.log(record)
            if bar is not None:
                bar.update(1)
                postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
                if "tok_per_s" in record:
                    postfix["tok_s"] = f"{record['tok_per_s']:.0f}"
                bar.set_postfix(**postfix)
            if (cfg.save_every and done % cfg.save_every == 0) or done == end:
                save_checkpoint(cfg.output_dir, done, model, optimizer,
                                {"data": data.state_dict(), "config": to_dict(cfg)}, env,
                                keep=cfg.keep_checkpoints)
                last_saved = done
        if end == cfg.steps and last_saved == cfg.steps:
            # the finished stage's model, where the next stage's model.init_from points
            path = os.path.join(cfg.output_dir, "model")
            save_hf_model(model, path, env)
            if env.is_main:  # a complete model directory: `qwen3-fast chat --model` loads it
                tokenizer.save_pretrained(path)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return out


__all__ = ["run_steps"]
