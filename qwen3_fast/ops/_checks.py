"""Input checks shared by the ops: each failure names the argument and what was expected.

Wrong types and dtypes raise TypeError; wrong shapes, devices, layouts and sizes raise
ValueError. Checks read only metadata, so they also run under torch.compile tracing.
"""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(t: object, name: str, *, dtypes=FLOAT_DTYPES, min_ndim: int = 1,
                 ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {_names(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "expected the same device")


def check_last_dim(t: torch.Tensor, name: str, size: int | None = None, *,
                   what: str = "last dimension") -> int:
    n = t.shape[-1]
    if n == 0:
        raise ValueError(f"{name} has an empty {what} (shape {tuple(t.shape)}); expected > 0")
    if size is not None and n != size:
        raise ValueError(f"{name} has {what} {n}; expected {size}")
    if t.stride(-1) != 1 and t.numel() > n:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got "
                         f"strides {tuple(t.stride())}; call .contiguous() first")
    return n


def check_weight_dtype(weight: torch.Tensor, x: torch.Tensor, name: str = "weight") -> None:
    if weight.dtype != x.dtype and weight.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {weight.dtype}; expected the input dtype "
                        f"{x.dtype} or float32")
    if x.dtype == torch.float64 and weight.dtype != torch.float64:
        raise TypeError(f"{name} has dtype {weight.dtype}; expected float64 like the input")


def check_same_shape(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} has shape {tuple(b.shape)}; expected {a_name}'s shape {tuple(a.shape)}")


def check_same_dtype(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{b_name} has dtype {b.dtype}; expected {a_name}'s dtype {a.dtype}")


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0.0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


# ------------------------------------------------------------------ token labels (fused LM-head ops)
def check_token_labels(labels: object, name: str, hidden: torch.Tensor, hidden_name: str) -> None:
    """`labels`: an int64/int32 tensor shaped like `hidden` without its last dim, same device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} has dtype {labels.dtype}; expected int64 or int32")
    lead = tuple(hidden.shape[:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(f"{name} has shape {tuple(labels.shape)}; expected {hidden_name}'s "
                         f"leading shape {lead}")
    check_same_device(hidden, hidden_name, labels, name)


def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def check_label_values(y: torch.Tensor, name: str, vocab: int, ignore_index: int) -> None:
    """Every label of the flat int64 `y` is in [0, vocab) or ignore_index (one host sync;
    skipped while compiling)."""
    if vocab == 0:
        raise ValueError("weight has 0 rows; expected a vocabulary of at least 1")
    if not torch.compiler.is_compiling() and y.numel():
        bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
        if bool(bad.any()):
            raise ValueError(f"{name} has value {int(y[bad][0])}; expected values in "
                             f"[0, {vocab}) or ignore_index ({ignore_index})")
