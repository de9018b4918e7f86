"""Process group and FSDP2 sharding for ``torchrun --nproc-per-node N -m qwen3_fast.train``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them (plain ``python -m``) the run is
single-process and nothing here touches torch.distributed. Backend: NCCL for CUDA, gloo for
the CPU. Sharding is FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per decoder
layer, then the root (embeddings, final norm, LM head), parameters kept in their own dtype
(precision comes from autocast in the trainer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when there is one; pick this rank's device."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: each decoder layer is a unit (all-gathered just in time), then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistEnv", "all_reduce_sum", "barrier", "broadcast_object", "init_distributed",
           "shard_model", "shutdown"]
