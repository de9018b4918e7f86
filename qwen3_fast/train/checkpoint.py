"""Training checkpoints: atomic, exactly resumable, reshardable, with an HF-format model.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/
        model/              HF format (config.json + safetensors): the next stage loads it
        dcp/                model + optimizer state, torch.distributed.checkpoint (sharded
                            under FSDP; loads on any number of ranks, also on one process)
        rng_<rank>.pt       torch / CUDA / python RNG states of each rank
        trainer_state.json  step, data stream position, world size, the run's config
    latest                  "step_00000100": the newest complete checkpoint

Atomicity: everything is written into ``.tmp-step_...`` first; only when every rank has
finished is the directory renamed to its final name (a rename within one directory is
atomic on POSIX) and then ``latest`` replaced through a temp file + ``os.replace``. A kill
at any moment therefore leaves ``latest`` naming a complete checkpoint; leftover temp
directories are ignored and removed by the next save. The schedule has no state of its own
(the learning rate is a function of the step), so the step is the scheduler state.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from typing import Optional

import torch
from torch import nn

from qwen3_fast.train.distributed import DistEnv, barrier, broadcast_object

LATEST = "latest"


class _FullModel:
    """What model/checkpoint.save_pretrained reads from a model, for a gathered state dict."""

    def __init__(self, config, state: dict, dtype: torch.dtype):
        self.config, self._state, self.dtype = config, state, dtype

    def state_dict(self) -> dict:
        return self._state


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _quiet_single_process(fn):
    """DCP warns on every single-process save/load that it assumes one process: intended."""
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn(*args, **kwargs)
    return wrapped


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def full_model_state(model: nn.Module) -> dict:
    """The unsharded model state dict (on the CPU; complete on rank 0 under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_hf_model(model: nn.Module, path: str, env: DistEnv) -> None:
    """HF-format model directory from a possibly sharded model (collective under FSDP)."""
    from qwen3_fast.model.checkpoint import save_pretrained

    state = full_model_state(model)
    if env.is_main:
        dtype = next(iter(state.values())).dtype
        save_pretrained(_FullModel(model.config, state, dtype), path)


def save_checkpoint(output_dir: str, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict, env: DistEnv,
                    keep: int = 2) -> str:
    """Write checkpoint `step` atomically (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    root = os.path.join(output_dir, "checkpoints")
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if env.is_main:
        os.makedirs(root, exist_ok=True)
        for entry in os.listdir(root):  # temp dirs of interrupted saves
            if entry.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        os.makedirs(tmp)
    barrier(env)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    _quiet_single_process(dcp.save)({"model": model_sd, "optim": optim_sd},
                                    checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_{env.rank}.pt"))
    save_hf_model(model, os.path.join(tmp, "model"), env)
    if env.is_main:
        state = dict(trainer_state, step=step, world_size=env.world)
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
    barrier(env)
    if env.is_main:
        for dirpath, _dirs, files in os.walk(tmp):
            for fname in files:  # make the contents durable before the rename publishes them
                with open(os.path.join(dirpath, fname), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(final):  # a re-save of the same step (rerun after a crash)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, LATEST), name + "\n")
        _prune(root, keep, name)
    barrier(env)
    return final


def _prune(root: str, keep: int, newest: str) -> None:
    done = sorted(e for e in os.listdir(root) if e.startswith("step_"))
    for old in done[:-keep]:
        if old != newest:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The directory `latest` names, or None when there is no complete checkpoint."""
    root = os.path.join(output_dir, "checkpoints")
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise RuntimeError(f"{root}/latest names {name!r}, which is incomplete or missing")
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    env: DistEnv) -> dict:
    """Restore model, optimizer and RNG from checkpoint `path`; returns trainer_state.json.

    Works on any number of ranks: DCP reshards the saved model and optimizer shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _quiet_single_process(dcp.load)(state, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rng_file = os.path.join(path, f"rng_{env.rank}.pt")
    if os.path.isfile(rng_file):  # a rank the saving run did not have keeps its seed
        set_rng_state(torch.load(rng_file, weights_only=True))
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        trainer_state = json.load(f)
    return broadcast_object(trainer_state, env)


__all__ = ["LATEST", "full_model_state", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint", "save_hf_model"]
