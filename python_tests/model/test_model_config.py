"""Qwen3Config: HF config.json in both RoPE forms, presets, validation, round trips."""
from __future__ import annotations

import json

import pytest

from qwen3_fast.model.config import PRESETS, Qwen3Config

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def test_both_rope_forms_give_the_same_config():
    legacy = Qwen3Config.from_dict({**TINY, "model_type": "qwen3", "rope_theta": 1e6,
                                    "rope_scaling": YARN})
    new = Qwen3Config.from_dict({**TINY, "model_type": "qwen3",
                                 "rope_parameters": {**YARN, "rope_theta": 1e6}})
    assert legacy == new
    assert new.rope_theta == 1e6 and new.rope_type == "yarn" and new.rope_scaling["factor"] == 4.0
    default = Qwen3Config.from_dict({**TINY, "rope_parameters": {"rope_type": "default",
                                                                 "rope_theta": 5e5}})
    assert default.rope_theta == 5e5 and default.rope_scaling is None


def test_head_dim_defaults_and_extra_keys_are_kept():
    cfg = Qwen3Config.from_dict({**TINY, "some_future_key": [1, 2], "torch_dtype": "bfloat16"})
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 2
    assert cfg.extra == {"some_future_key": [1, 2], "torch_dtype": "bfloat16"}
    d = cfg.to_dict()
    assert d["some_future_key"] == [1, 2] and d["head_dim"] == 16
    assert d["architectures"] == ["Qwen3ForCausalLM"] and "num_experts" not in d
    assert Qwen3Config.from_dict(d) == cfg


def test_moe_dict_round_trip_and_transformers5_expert_name():
    cfg = Qwen3Config.from_dict({**TINY, "model_type": "qwen3_moe", "num_local_experts": 8,
                                 "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                 "mlp_only_layers": [0], "norm_topk_prob": True})
    assert cfg.is_moe and cfg.num_experts == 8
    assert [cfg.is_sparse_layer(i) for i in range(2)] == [False, True]
    d = cfg.to_dict()
    assert d["architectures"] == ["Qwen3MoeForCausalLM"] and d["num_experts"] == 8
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg.rope_theta}
    assert Qwen3Config.from_dict(json.loads(json.dumps(d))) == cfg
    assert Qwen3Config.from_dict({**TINY, "model_type": "qwen3_moe"}).num_experts == 128


def test_json_files(tmp_path):
    cfg = Qwen3Config(**TINY, rope_scaling=YARN)
    cfg.to_json_file(tmp_path / "config.json")
    assert Qwen3Config.from_pretrained(tmp_path) == cfg
    assert Qwen3Config.from_json_file(tmp_path / "config.json") == cfg
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Qwen3Config.from_json_file(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        Qwen3Config.from_pretrained(tmp_path / "nowhere")


def test_transformers_reads_our_dict_and_we_read_theirs():
    transformers = pytest.importorskip("transformers")
    ours = Qwen3Config(**TINY, head_dim=16, rope_theta=1e6, rope_scaling=YARN,
                       tie_word_embeddings=True)
    hf = transformers.Qwen3Config.from_dict(ours.to_dict())
    assert (hf.hidden_size, hf.head_dim, hf.num_key_value_heads, hf.tie_word_embeddings) == (
        64, 16, 2, True)
    assert Qwen3Config.from_dict(hf.to_dict()) .rope_scaling["factor"] == 4.0
    moe = Qwen3Config(**TINY, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2)
    hf_moe = transformers.Qwen3MoeConfig.from_dict(moe.to_dict())
    assert hf_moe.num_experts == 8 and hf_moe.num_experts_per_tok == 2
    back = Qwen3Config.from_dict(hf_moe.to_dict())
    assert back.num_experts == 8 and back.rope_theta == moe.rope_theta


@pytest.mark.parametrize("name,params_b", [
    ("Qwen3-0.6B", 0.6), ("1.7B", 1.7), ("4B", 4.0), ("Qwen/Qwen3-8B", 8.2), ("14B", 14.8),
    ("32B", 32.8), ("30B-A3B", 30.5), ("qwen3-235b-a22b", 235.1)])
def test_presets(name, params_b):
    cfg = Qwen3Config.from_name(name)
    assert cfg.head_dim == 128 and cfg.rope_theta == 1e6 and cfg.vocab_size == 151936
    assert abs(cfg.num_parameters() / 1e9 - params_b) / params_b < 0.08
    assert cfg.is_moe == ("A" in name.upper().split("-")[-1])


def test_preset_names_and_overrides():
    assert Qwen3Config.from_name("0.6B") == Qwen3Config.from_name("Qwen3-0.6B")
    assert Qwen3Config.from_name("0.6B", num_hidden_layers=4).num_hidden_layers == 4
    assert set(PRESETS) >= {"Qwen3-0.6B", "Qwen3-30B-A3B", "Qwen3-235B-A22B"}
    with pytest.raises(ValueError, match="unknown model name"):
        Qwen3Config.from_name("Qwen3-7B")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_key_value_heads=3), "not divisible"),
    (dict(model_type="llama"), "model_type"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "yarn"}), "factor"),
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_experts=4), "qwen3_moe"),
    (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=8), "exceeds"),
    (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, mlp_only_layers=[5]),
     "mlp_only_layers"),
    (dict(use_sliding_window=True), "sliding"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Qwen3Config(**{**TINY, **kwargs})


def test_typos_and_missing_keys():
    with pytest.raises(TypeError, match="hiden_size"):
        Qwen3Config(hiden_size=64)  # constructor keys are checked
    with pytest.raises(ValueError, match="missing required key"):
        Qwen3Config.from_dict({k: v for k, v in TINY.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        Qwen3Config.from_dict({**TINY, "model_type": "gpt2"})
