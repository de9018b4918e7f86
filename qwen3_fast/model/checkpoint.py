"""HF checkpoint I/O: ``from_pretrained`` and ``save_pretrained`` (safetensors only).

Reads a local directory with config.json and model.safetensors, or shards listed in
model.safetensors.index.json. MoE experts are accepted as per-expert HF keys
(``mlp.experts.{e}.{gate,up,down}_proj.weight``) or transformers-5 fused keys
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) and land in the
model's stacked parameters. ``save_pretrained`` writes per-expert keys (what HF checkpoints
on disk hold), the index when sharded, and config.json.

Loading validates everything before allocating: every header is read (and checked against
the file size, so a truncated file is caught), every key is mapped to a parameter and its
shape checked, and coverage is checked; only then is the model, built on the meta device,
materialized on the target device in the target dtype and filled tensor by tensor with
``safe_open`` (peak host memory: about one copy of the weights). Any problem raises
:class:`CheckpointError` (a ValueError) and no model is returned. Pickle files are never read.
Departure from HF: ``dtype=None`` keeps the stored dtype (HF 4.x defaults to float32); a
tied ``lm_head.weight`` in a checkpoint is ignored after its shape is checked, as HF does.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen3_fast.model.config import Qwen3Config

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as-is (the message says why)."""


# ------------------------------------------------------------------ files and headers
def _shard_files(path: str) -> dict[str, list[str]]:
    """{absolute shard file: [keys the index assigns to it]} (None list: all keys)."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object of key -> shard name")
        root = os.path.realpath(path)
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            if (not isinstance(name, str) or not name or os.path.isabs(name)
                    or name != os.path.basename(name) or name in (".", "..")):
                raise CheckpointError(f"{index}: shard name {name!r} for {key!r} must be a plain "
                                      "file name inside the checkpoint directory")
            file = os.path.join(root, name)
            if os.path.dirname(os.path.realpath(file)) != root:
                raise CheckpointError(f"{index}: shard {name!r} resolves outside {root}")
            files.setdefault(file, []).append(key)
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointError(f"shard {os.path.basename(file)!r} listed in {index} is "
                                      "missing")
        return files
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return {single: None}
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} (only safetensors checkpoints are "
                          "read; pickled .bin files are not)")


def _read_header(file: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, safetensors dtype)}, checking the data section fits the file size."""
    size = os.path.getsize(file)
    name = os.path.basename(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{name}: truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{name}: truncated (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{name}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    out, end = {}, 0
    for key, info in header.items():
        try:
            shape, dtype, (_start, stop) = tuple(info["shape"]), info["dtype"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: corrupt header entry for {key!r}") from None
        out[key] = (shape, dtype)
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{name}: truncated (data needs {8 + n + end} bytes, file has "
                              f"{size})")
    return out


# ------------------------------------------------------------------ load plan
def _plan(files: dict, expected: dict[str, tuple], config: Qwen3Config) -> tuple[list, str]:
    """Map checkpoint keys to parameters; returns ([(file, key, param, slice)], stored dtype)."""
    plan, covered, problems, unexpected, stored_dtype = [], {}, [], [], None
    inter = config.moe_intermediate_size
    for file, listed in files.items():
        header = _read_header(file)
        keys = header.keys() if listed is None else listed
        for key in keys:
            if key not in header:
                raise CheckpointError(f"{key!r} is listed for {os.path.basename(file)} in the "
                                      "index but is not in that file")
            shape, st_dtype = header[key]
            if st_dtype not in _ST_DTYPES:
                problems.append(f"{key}: dtype {st_dtype} is not a float dtype")
                continue
            stored_dtype = stored_dtype or st_dtype
            m = _EXPERT_KEY.match(key)
            if m:
                prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
                param = f"{prefix}.{'down_proj' if kind == 'down' else 'gate_up_proj'}"
                if param not in expected or e >= expected[param][0]:
                    unexpected.append(key)
                    continue
                full = expected[param]
                want = (full[1], full[2]) if kind == "down" else (inter, full[2])
                part = (e, kind)
                where = (e,) if kind == "down" else (e, slice(0, inter) if kind == "gate"
                                                     else slice(inter, 2 * inter))
            elif key == "lm_head.weight" and config.tie_word_embeddings:
                param, want, part, where = None, expected["model.embed_tokens.weight"], None, None
            else:
                if key not in expected:
                    unexpected.append(key)
                    continue
                param, want, part, where = key, expected[key], "all", None
            if tuple(shape) != tuple(want):
                problems.append(f"{key}: checkpoint shape {list(shape)}, model expects {list(want)}")
                continue
            if param is None:
                continue  # tied lm_head: the embedding is the weight
            parts = covered.setdefault(param, set())
            if part in parts or ("all" in parts) or (part == "all" and parts):
                problems.append(f"{key}: {param} is given twice (fused and per-expert keys?)")
            parts.add(part)
            plan.append((file, key, param, where))
    missing = []
    for param, shape in expected.items():
        parts = covered.get(param, set())
        if "all" in parts:
            continue
        if param.endswith("mlp.experts.gate_up_proj") or param.endswith("mlp.experts.down_proj"):
            kinds = ("down",) if param.endswith("down_proj") else ("gate", "up")
            prefix = param.rsplit(".", 1)[0]
            lost = [f"{prefix}.{e}.{k}_proj.weight" for e in range(shape[0]) for k in kinds
                    if (e, k) not in parts]
            if lost and len(lost) == shape[0] * len(kinds) and not parts:
                missing.append(param + " (or its per-expert keys)")
            else:
                missing.extend(lost)
        else:
            missing.append(param)
    msgs = []
    if missing:
        msgs.append(f"missing keys ({len(missing)}): {_few(missing)}")
    if unexpected:
        msgs.append(f"unexpected keys ({len(unexpected)}): {_few(unexpected)}")
    if problems:
        msgs.append(f"bad tensors ({len(problems)}): {_few(problems)}")
    if msgs:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(msgs))
    return plan, stored_dtype


def _few(items: list, n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------ public
def from_pretrained(path: str | os.PathLike, dtype: Optional[torch.dtype] = None, device=None,
                    model_class=None):
    """Load a Qwen3 / Qwen3-MoE HF checkpoint directory.

    dtype: parameter dtype (None: as stored); device: target device (default cpu).
    """
    from qwen3_fast.model.modeling import Qwen3ForCausalLM

    model_class = model_class or Qwen3ForCausalLM
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = Qwen3Config.from_pretrained(path)
    device = torch.device(device if device is not None else "cpu")
    with torch.device("meta"):
        model = model_class(config, init_weights=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    plan, stored = _plan(_shard_files(path), expected, config)
    dtype = dtype or _ST_DTYPES.get(stored, torch.float32)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())
    by_file: dict[str, list] = {}
    for file, key, param, where in plan:
        by_file.setdefault(file, []).append((key, param, where))
    load_device = "cpu" if device.type == "meta" else str(device)
    with torch.no_grad():
        for file, items in by_file.items():
            try:
                with safe_open(file, framework="pt", device=load_device) as f:
                    for key, param, where in items:
                        dest = params[param] if where is None else params[param][where]
                        dest.copy_(f.get_tensor(key))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{os.path.basename(file)}: cannot read tensors ({e})") from e
    return model.eval()


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '500MB', '10KB', or an int of bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or an int")
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        value = int(float(m.group(1)) * base ** " KMGT".index(unit[0] if unit != "B" else " "))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _hf_tensors(model) -> list[tuple[str, object]]:
    """(HF key, tensor or thunk) in state-dict order, experts expanded to per-expert keys."""
    config, out = model.config, []
    inter = config.moe_intermediate_size
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                out.append((f"{prefix}.{e}.gate_proj.weight", t[e, :inter]))
                out.append((f"{prefix}.{e}.up_proj.weight", t[e, inter:]))
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.rsplit(".", 1)[0]
            out.extend((f"{prefix}.{e}.down_proj.weight", t[e]) for e in range(t.shape[0]))
        else:
            out.append((key, t))
    return out


def save_pretrained(model, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and model.safetensors (or shards + index) in HF format."""
    limit = parse_size(max_shard_size)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = _hf_tensors(model)
    shards, current, current_size = [], [], 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append((key, t))
        current_size += nbytes
    if current or not shards:
        shards.append(current)
    for old in os.listdir(path):  # stale shards of an earlier save would confuse loaders
        if old == INDEX or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old):
            os.remove(os.path.join(path, old))
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # clone: per-expert slices share the stacked storage, which save_file refuses
        data = {k: t.detach().to("cpu").clone().contiguous() for k, t in shard}
        save_file(data, os.path.join(path, name), metadata={"format": "pt"})
        for k, t in data.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del data
    if len(shards) > 1:
        with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
    config = model.config.to_dict()
    dtype_name = str(model.dtype).replace("torch.", "")
    config["torch_dtype"] = config["dtype"] = dtype_name
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["CheckpointError", "from_pretrained", "parse_size", "save_pretrained"]
