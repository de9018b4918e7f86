"""qwen3_fast.model: Qwen3 config, dense/MoE model and HF checkpoint I/O.

    from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
"""
from qwen3_fast.model.checkpoint import from_pretrained, save_pretrained
from qwen3_fast.model.config import PRESETS, Qwen3Config
from qwen3_fast.model.modeling import (CausalLMOutput, Qwen3ForCausalLM, Qwen3Model,
                                       Qwen3MoeForCausalLM)

__all__ = ["CausalLMOutput", "PRESETS", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model",
           "Qwen3MoeForCausalLM", "from_pretrained", "save_pretrained"]
