"""The inference engine: sampling, the batched generate/chat loop, HF-style generate, CLI.

    from qwen3_fast import LLM, SamplingParams
    llm = LLM("path/to/Qwen3-0.6B", dtype=torch.bfloat16)
    out = llm.chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    print(out.content, out.finish_reason)

Modules: sampling.py (penalties, temperature, top-k/p, min-p, seeded draws), params.py
(SamplingParams, defaults, results), textstream.py (incremental detokenization, stop strings),
engine.py (LLM), speculative.py (QuantSpecConfig: self-speculative decoding over the int8
cache), hf_generate.py (``Qwen3ForCausalLM.generate``), cli.py (``qwen3-fast generate`` /
``qwen3-fast chat``).
"""
__all__ = ["LLM", "QuantSpecConfig", "RequestOutput", "SamplingParams", "StreamEvent"]
_WHERE = {"LLM": "engine", "QuantSpecConfig": "speculative", "RequestOutput": "params",
          "SamplingParams": "params", "StreamEvent": "params"}


def __getattr__(name: str):
    # Lazy: `qwen3-fast info` registers the generate/chat subcommands through generate.cli
    # and should not pay for importing torch and the ops to do so.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"qwen3_fast.generate.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'qwen3_fast.generate' has no attribute {name!r}")
