"""``Qwen3ForCausalLM.generate``: a drop-in for transformers' ``model.generate`` on token ids.

Takes ``input_ids [B, S]`` (left-padded as transformers expects, with ``attention_mask``;
right padding or no padding also work: a row's prompt is its tokens where the mask is 1) and
returns ``[B, S + n]``: the input as given followed by the n generated columns, n <= 
max_new_tokens. As in transformers, a finished row (it produced an eos id) is filled with
``pad_token_id`` (default: the first eos id) until every row has finished or n reaches
max_new_tokens, and the repetition penalty sees the whole input row, padding included.

Internally the prompts take the engine's ragged path (right padding in one prefill pass,
then one cached decode step per token), so the positions of each row start at 0 at its first
real token, which is what transformers derives from a left-padding mask.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from qwen3_fast.generate.engine import decode_step, prefill
from qwen3_fast.generate.params import SamplingParams
from qwen3_fast.generate.sampling import BatchSampler


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, Tensor):
        eos = eos.tolist()
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


@torch.inference_mode()
def hf_generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 50, min_p: Optional[float] = None,
                repetition_penalty: float = 1.0,
                eos_token_id: Union[int, Sequence[int], None] = None,
                pad_token_id: Optional[int] = None, seed: Optional[int] = None,
                kv_cache: str = "dense") -> Tensor:
    """Greedy (do_sample=False) or sampled generation; see the module docstring.

    Parameters
    ----------
    input_ids : [B, S] int64
    attention_mask : [B, S] 1 = token, 0 = padding (default: all ones)
    max_new_tokens, do_sample, temperature, top_p, top_k (0 = off), min_p,
    repetition_penalty : transformers' meanings and defaults
    eos_token_id : int or list (default: the model config's eos_token_id)
    pad_token_id : fills finished rows (default: config pad_token_id, else the first eos)
    seed : seeds each row's generator (row b uses seed + b) for reproducible sampling
    kv_cache : "dense" or "hierarchical" (8-bit)

    Returns
    -------
    [B, S + n] int64 on input_ids' device.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor [B, S], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != (b, s):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(b, s)}")
    keep = attention_mask.to(torch.bool).cpu()
    rows = input_ids.cpu()
    prompts = [rows[i][keep[i]].tolist() for i in range(b)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every row of attention_mask needs at least one 1")
    eos = _eos_list(eos_token_id if eos_token_id is not None else model.config.eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else \
            (eos[0] if eos else 0)
    params = [SamplingParams(temperature=float(temperature) if do_sample else 0.0,
                             top_p=top_p, top_k=top_k or 0, min_p=min_p or 0.0,
                             repetition_penalty=repetition_penalty,
                             seed=None if seed is None else seed + i) for i in range(b)]
    params = [p.resolved({}) for p in params]
    sampler = BatchSampler(params, rows.tolist(), model.config.vocab_size, model.device)
    cache = model.new_cache(b, max(len(p) for p in prompts) + max_new_tokens, kv_cache)
    dev = model.device
    eos_t = torch.tensor(eos or [-1], device=dev)
    unfinished = torch.ones(b, dtype=torch.bool, device=dev)
    out = []
    tokens = sampler.sample(prefill(model, prompts, cache))
    for step in range(max_new_tokens):
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
        sampler.observe(tokens)
        out.append(tokens)
        unfinished &= ~torch.isin(tokens, eos_t)
        # transformers checks its stopping criteria every step too (one host sync)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        tokens = sampler.sample(decode_step(model, tokens, cache))
    new = torch.stack(out, 1).to(input_ids.device)
    return torch.cat((input_ids, new), 1)
