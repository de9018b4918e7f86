"""A tiny random Qwen3 checkpoint directory with a small test tokenizer, for engine tests."""
from __future__ import annotations

import json
import os

import pytest
import torch

from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM
from qwen3_fast.tokenizer_train import build_test_tokenizer


def randomize_norms(model):
    """Norm weights start at 1; add N(0, 0.1) so their math is exercised. Returns model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_model_dir(path, moe: bool = False, generation_config: dict | None = None,
                   seed: int = 0, init: float = 0.2, layers: int = 2) -> str:
    """Write config.json + safetensors + tokenizer files (+ generation_config.json) to path.

    init 0.2 makes the random logits peaky, so greedy choices are not decided by rounding."""
    path = os.fspath(path)
    tok = build_test_tokenizer(save_dir=path)
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 model_type="qwen3_moe") if moe else {}
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=512, rope_theta=1e6,
                      initializer_range=init, tie_word_embeddings=True,
                      eos_token_id=tok.im_end_id, **extra)
    torch.manual_seed(seed)
    model = randomize_norms(Qwen3ForCausalLM(cfg))
    model.save_pretrained(path)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread (no OpenMP wake-ups), and timings stay
    steady on a shared 2-core machine. Import it into a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
