"""Checkpoint I/O: round trips with transformers, sharding, fused expert keys, bad checkpoints."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_testlib import BASE, MOE, TF5, hf_model, max_rel_err, per_expert
from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM
from qwen3_fast.model.checkpoint import CheckpointError, parse_size

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))


def tiny(moe: bool, **kw) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = dict(BASE, rope_theta=1e6, **(dict(MOE, model_type="qwen3_moe") if moe else {}), **kw)
    return Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_our_save_loads_in_transformers(tmp_path, moe):
    transformers = pytest.importorskip("transformers")
    ours = tiny(moe, tie_word_embeddings=not moe)
    ours.save_pretrained(tmp_path, max_shard_size=40_000)  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    cls = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    hf = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = hf(IDS).logits
    assert max_rel_err(logits(ours), ref) < 1e-5
    again = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again), logits(ours))
    if not moe:
        assert again.lm_head.weight is again.model.embed_tokens.weight


def test_single_file_keys_are_hf_per_expert(tmp_path):
    ours = tiny(True)
    ours.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["torch_dtype"] == "float32"


def test_fused_expert_keys_load(tmp_path):
    """transformers-5 in-memory layout (stacked experts) written as-is is accepted."""
    ours = tiny(True)
    ours.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(logits(Qwen3ForCausalLM.from_pretrained(tmp_path)), logits(ours))


@pytest.mark.skipif(not TF5, reason="transformers 5.x layout test (4.x installed)")
def test_transformers5_fused_state_dict_loads(tmp_path):
    hf = hf_model(moe=True)
    hf.save_pretrained(tmp_path)  # config.json (and per-expert keys on disk)
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with torch.no_grad():
        ref = hf(IDS).logits
    assert max_rel_err(logits(Qwen3ForCausalLM.from_pretrained(tmp_path)), ref) < 1e-5


@pytest.mark.skipif(TF5, reason="transformers 4.x layout test (5.x installed)")
def test_transformers4_per_expert_state_dict_matches(tmp_path):
    hf = hf_model(moe=True)
    hf.save_pretrained(tmp_path)
    ours = Qwen3ForCausalLM.from_pretrained(tmp_path)
    theirs = hf.state_dict()
    mine = per_expert(ours.state_dict(), MOE["moe_intermediate_size"])
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)


def test_dtype_and_device_arguments(tmp_path):
    tiny(False).save_pretrained(tmp_path)
    model = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert Qwen3ForCausalLM.from_pretrained(tmp_path).dtype == torch.float32  # as stored


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


# ------------------------------------------------------------------ bad checkpoints
@pytest.fixture()
def sharded(tmp_path):
    tiny(True).save_pretrained(tmp_path, max_shard_size=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    return tmp_path, index


def _rewrite(path, edit):
    data = load_file(path)
    edit(data)
    save_file(data, path, metadata={"format": "pt"})


def _shard_of(index, key):
    return index["weight_map"][key]


def _load_fails(path, match):
    with pytest.raises(CheckpointError, match=match):
        Qwen3ForCausalLM.from_pretrained(path)


def test_missing_key(sharded):
    path, index = sharded
    key = "model.layers.1.self_attn.k_norm.weight"
    _rewrite(path / _shard_of(index, key), lambda d: d.pop(key))
    index["weight_map"].pop(key)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _load_fails(path, r"missing keys \(1\): model\.layers\.1\.self_attn\.k_norm\.weight")


def test_missing_expert_key(sharded):
    path, index = sharded
    key = "model.layers.0.mlp.experts.5.up_proj.weight"
    _rewrite(path / _shard_of(index, key), lambda d: d.pop(key))
    index["weight_map"].pop(key)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _load_fails(path, "missing keys.*experts.5.up_proj.weight")


def test_key_in_index_but_not_in_shard(sharded):
    path, index = sharded
    key = "model.norm.weight"
    _rewrite(path / _shard_of(index, key), lambda d: d.pop(key))
    _load_fails(path, "model.norm.weight.*not in that file")


def test_unexpected_key(sharded):
    path, index = sharded
    name = _shard_of(index, "model.norm.weight")
    _rewrite(path / name, lambda d: d.update({"model.layers.0.mlp.experts.9.up_proj.weight":
                                              torch.zeros(32, 64), "model.extra.weight": torch.zeros(2)}))
    index["weight_map"].update({"model.layers.0.mlp.experts.9.up_proj.weight": name,
                                "model.extra.weight": name})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _load_fails(path, r"unexpected keys \(2\).*experts.9.up_proj.weight.*model.extra.weight")


def test_wrong_shape_names_key_and_both_shapes(sharded):
    path, index = sharded
    key = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(path / _shard_of(index, key), lambda d: d.update({key: torch.zeros(32, 64)}))
    _load_fails(path, r"q_proj.weight: checkpoint shape \[32, 64\], model expects \[64, 64\]")


def test_missing_shard(sharded):
    path, index = sharded
    name = sorted(set(index["weight_map"].values()))[-1]
    os.remove(path / name)
    _load_fails(path, f"shard '{name}'.*missing")


def test_truncated_shard(sharded):
    path, index = sharded
    name = sorted(set(index["weight_map"].values()))[0]
    size = os.path.getsize(path / name)
    with open(path / name, "r+b") as f:
        f.truncate(size - 100)
    _load_fails(path, f"{name}: truncated")
    with open(path / name, "r+b") as f:
        f.truncate(4)
    _load_fails(path, f"{name}: truncated")


@pytest.mark.parametrize("bad", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors"])
def test_index_shard_outside_directory(sharded, bad):
    path, index = sharded
    index["weight_map"]["model.norm.weight"] = bad
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _load_fails(path, "plain file name inside the checkpoint directory")


def test_symlinked_shard_outside_directory(sharded, tmp_path_factory):
    path, index = sharded
    name = _shard_of(index, "model.norm.weight")
    outside = tmp_path_factory.mktemp("outside") / name
    os.replace(path / name, outside)
    os.symlink(outside, path / name)
    _load_fails(path, "resolves outside")


def test_no_safetensors_and_bad_index(tmp_path):
    Qwen3Config(**BASE).to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle we would ever read")
    _load_fails(tmp_path, "only safetensors")
    (tmp_path / "model.safetensors.index.json").write_text("{]")
    _load_fails(tmp_path, "not a valid safetensors index")
    with pytest.raises(FileNotFoundError):
        Qwen3ForCausalLM.from_pretrained(tmp_path / "absent")


def test_config_mismatch_reports_all_problems(tmp_path):
    tiny(False).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["vocab_size"] = 300
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _load_fails(tmp_path, r"missing keys.*model.layers.2.*bad tensors.*embed_tokens.weight: "
                          r"checkpoint shape \[256, 64\], model expects \[300, 64\]")
