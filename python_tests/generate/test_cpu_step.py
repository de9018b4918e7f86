"""The one-call CPU decode step (qwen3_fast/generate/cpu_step.py, csrc/cpu/decode_layers.cpp).

It must be invisible: logits and the cache it leaves are bitwise the eager model's, step
after step, for ragged batches, head dims with and without the vdpbf16ps attention path,
tied and untied heads, under the engine's thread cap and without, over the dense cache and
the hierarchical one at 8 and 4 bits (mixed with the eager steps that quantize a group);
the engine generates the same tokens with it on and off (plain and speculative); and every
case it does not reproduce (MoE, a quantizing step, hooks, wrappers, autograd, fp32, forced
backends, batches over 16) takes the eager model.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gen_testlib import one_thread, randomize_norms, tiny_model_dir  # noqa: F401 (autouse fixture)
from qwen3_fast import LLM, QuantSpecConfig, SamplingParams, _ext
from qwen3_fast.generate import cpu_step
from qwen3_fast.generate.engine import decode_step
from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM
from qwen3_fast.ops import _backend
from qwen3_fast.ops._kernel_args import cpu_thread_cap

pytestmark = pytest.mark.skipif(
    not (_ext.available() and hasattr(_ext.extension(), "decode_layers_cpu")),
    reason="_C not built")


def _model(head_dim=64, tied=True, layers=3, seed=0, **extra):
    cfg = Qwen3Config(vocab_size=320, hidden_size=96, intermediate_size=160,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=head_dim, max_position_embeddings=256, rope_theta=1e4,
                      initializer_range=0.2, tie_word_embeddings=tied, **extra)
    torch.manual_seed(seed)
    return randomize_norms(Qwen3ForCausalLM(cfg)).to(torch.bfloat16).eval()


def _prefilled(model, lens, max_len=64, kind="dense", group=128):
    """A cache after a right-padded prefill of rows with the given lengths."""
    b = len(lens)
    extra = dict(group_size=group, max_speculative_tokens=4) if kind == "hierarchical" else {}
    cache = model.new_cache(b, max_len, kind, **extra)
    ids = torch.randint(0, model.config.vocab_size, (b, max(lens)),
                        generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(max(lens)).view(1, -1) < torch.tensor(lens).view(-1, 1)).long()
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    return cache


def _equal_states(a, b):
    sa, sb = a.live_state(), b.live_state()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], list) and sa[key] and isinstance(sa[key][0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(sa[key], sb[key])), key
        else:
            assert sa[key] == sb[key], key


def _step(model, tok, cache, precision, fast):
    """One decode step: the one-call step where it applies (else the eager model, as the
    engine does), or always the eager model."""
    if fast:
        logits = cpu_step.try_decode_logits(model, tok, cache, precision)
        if logits is not None:
            return logits, True
    return model(tok.view(-1, 1), cache=cache, precision=precision).logits[:, -1], False


@pytest.mark.parametrize("head_dim,tied", [(64, True), (128, False), (80, True)])
@pytest.mark.parametrize("lens", [[5], [5, 17, 2], [3] * 16])
@pytest.mark.parametrize("cap", [None, 1])
def test_bitwise_equal_to_eager(head_dim, tied, lens, cap):
    model = _model(head_dim, tied)
    fast, eager = _prefilled(model, lens), _prefilled(model, lens)
    tok = torch.arange(len(lens)) + 7
    with torch.inference_mode(), cpu_thread_cap(cap):
        assert cpu_step.unsupported_reason(model, fast, len(lens)) is None
        for _ in range(5):
            a = cpu_step.decode_logits(model, tok, fast)
            b = model(tok.view(-1, 1), cache=eager).logits[:, -1]
            assert torch.equal(a, b)
            assert torch.equal(fast.lengths, eager.lengths)
            tok = a.argmax(-1)
    _equal_states(fast, eager)


@pytest.mark.parametrize("precision", [8, 4])
@pytest.mark.parametrize("lens", [[5], [13, 6, 2]])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hierarchical_bitwise_equal_to_eager(precision, lens, head_dim):
    """Group size 8: over 20 steps every row crosses group boundaries; those steps (the
    cache quantizes a group) run eagerly, the others in one call, and logits and cache
    equal the all-eager run's at every step."""
    model = _model(head_dim)
    caches = []
    for _ in range(2):
        c = model.new_cache(len(lens), 64, "hierarchical", group_size=8, max_speculative_tokens=4)
        ids = torch.randint(0, model.config.vocab_size, (len(lens), max(lens)),
                            generator=torch.Generator().manual_seed(1))
        mask = (torch.arange(max(lens)).view(1, -1) < torch.tensor(lens).view(-1, 1)).long()
        with torch.inference_mode():
            model(ids, attention_mask=mask, cache=c, logits_to_keep=1)
        caches.append(c)
    fast, eager = caches
    tok = torch.arange(len(lens)) + 3
    used = []
    with torch.inference_mode():
        for _ in range(20):
            a, one_call = _step(model, tok, fast, precision, True)
            b, _ = _step(model, tok, eager, precision, False)
            used.append(one_call)
            assert torch.equal(a, b)
            _equal_states(fast, eager)
            tok = a.argmax(-1)
    assert any(used) and not all(used)  # both kinds of step ran


@pytest.mark.parametrize("kind", ["dense", "hierarchical"])
@pytest.mark.parametrize("lens", [[9], [13, 6, 2]])
def test_verify_bitwise_equal_to_eager(kind, lens):
    """A speculative verify step (5 tokens per sequence, causal among them) then a rollback
    of some of them, twice: logits and cache equal the eager model's."""
    model = _model(128)
    fast, eager = (_prefilled(model, lens, kind=kind, group=8) for _ in range(2))
    g = torch.Generator().manual_seed(5)
    precision = 8 if kind == "hierarchical" else None
    with torch.inference_mode():
        for drop in ([1, 3, 0], [4, 0, 2]):
            drop = drop[:len(lens)]
            seq = torch.randint(0, model.config.vocab_size, (len(lens), 5), generator=g)
            while kind == "hierarchical" and fast.step_quantizes(5):  # plain steps past it
                tok = seq[:, 0]
                _step(model, tok, fast, precision, False)
                _step(model, tok, eager, precision, False)
            a = cpu_step.try_verify_logits(model, seq, fast, precision)
            assert a is not None
            b = model(seq, cache=eager, precision=precision).logits
            assert torch.equal(a, b)
            _equal_states(fast, eager)
            fast.rollback(drop)
            eager.rollback(drop)
            _equal_states(fast, eager)


def test_two_threads_and_rollback():
    """With a thread team (no cap) and after a rollback the next step still matches."""
    model = _model(128)
    fast, eager = _prefilled(model, [9, 4]), _prefilled(model, [9, 4])
    tok = torch.tensor([1, 2])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            for c in (fast, eager):
                model(tok.view(-1, 1), cache=c)
                c.rollback([1, 1])
            a = cpu_step.decode_logits(model, tok, fast)
            b = model(tok.view(-1, 1), cache=eager).logits[:, -1]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


def test_engine_decode_step_uses_it(monkeypatch):
    model = _model()
    cache = _prefilled(model, [4, 6])
    calls = []
    real = cpu_step._logits
    monkeypatch.setattr(cpu_step, "_logits", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        decode_step(model, torch.tensor([3, 4]), cache)
        monkeypatch.setenv("QWEN3_FAST_CPU_STEP", "0")
        decode_step(model, torch.tensor([3, 4]), cache)
    assert calls == [1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_cpu_step"), layers=3)


@pytest.mark.parametrize("engine_args", [dict(), dict(kv_cache="int8"),
                                         dict(kv_cache="int8", speculative=QuantSpecConfig(gamma=3))],
                         ids=["bf16", "int8", "speculative"])
def test_engine_tokens_equal_with_and_without(model_dir, monkeypatch, engine_args):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20, 21]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_new_tokens=9, ignore_eos=True,
                             presence_penalty=0.5),
              SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)]
    llm = LLM(model_dir, dtype=torch.bfloat16, max_seq_len=64, **engine_args)
    calls = []
    real = cpu_step._logits
    monkeypatch.setattr(cpu_step, "_logits", lambda *a: calls.append(a[1].shape[1]) or real(*a))
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("QWEN3_FAST_CPU_STEP", flag)
        outs[flag] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["1"] == outs["0"]
    assert [len(t) for t in outs["1"]] == [12, 9, 5]
    assert 1 in calls  # the one-call step ran (with the flag on), and so did the verify
    assert ("speculative" in engine_args) == (4 in calls)


class _Wrapped(nn.Linear):
    """A subclass, as LoRA-style wrappers are: project() runs the module, so must we."""


def _reasons():
    def moe():
        m = _model(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   model_type="qwen3_moe")
        return m, m.new_cache(1, 32)

    def flush():  # the next step quantizes a group: the eager write does that
        m = _model()
        c = _prefilled(m, [16], kind="hierarchical", group=8)
        return m, c

    def fp32():
        m = _model().float()
        return m, m.new_cache(1, 32)

    def hooked():
        m = _model()
        m.model.layers[1].mlp.register_forward_hook(lambda *a: None)
        return m, m.new_cache(1, 32)

    def wrapped():
        m = _model()
        old = m.model.layers[0].self_attn.q_proj
        new = _Wrapped(old.in_features, old.out_features, bias=False).to(torch.bfloat16)
        m.model.layers[0].self_attn.q_proj = new
        return m, m.new_cache(1, 32)

    def eps():
        m = _model()
        m.model.layers[2].self_attn.k_norm.variance_epsilon = 1e-3
        return m, m.new_cache(1, 32)

    return {"moe": moe, "flush": flush, "fp32": fp32, "hooked": hooked, "wrapped": wrapped,
            "eps": eps}


@pytest.mark.parametrize("case", list(_reasons()))
def test_unsupported_cases_take_the_eager_model(case):
    model, cache = _reasons()[case]()
    with torch.inference_mode():
        assert cpu_step.unsupported_reason(model, cache, 1) is not None


def test_unsupported_modes():
    model = _model()
    cache = model.new_cache(17, 32)
    with torch.inference_mode():
        assert "batch" in cpu_step.unsupported_reason(model, cache, 17)
        assert "batch" in cpu_step.unsupported_reason(model, _prefilled(model, [3, 4]), 2, n=9)
        assert "prefill" in cpu_step.unsupported_reason(model, model.new_cache(1, 32), 1)
        cache = _prefilled(model, [3])
        with _backend.use_backend("reference"):
            assert "forced" in cpu_step.unsupported_reason(model, cache, 1)
        with torch.profiler.profile():
            assert cpu_step.unsupported_reason(model, cache, 1) is not None
        with pytest.raises(ValueError, match="batch"):
            cpu_step.decode_logits(model, torch.zeros(17, dtype=torch.long), cache)
    # autograd: the eager ops must build the graph
    assert "grad" in cpu_step.unsupported_reason(model, cache, 1)


def test_launcher_checks_its_arguments():
    C = _ext.extension()
    lengths = torch.tensor([0], dtype=torch.int32)
    buf = torch.zeros(64, dtype=torch.bfloat16)
    p = buf.data_ptr()
    args = dict(x=p, weights=p, cache=p, n_quant=0, lengths=lengths.data_ptr(), cos=p, sin=p,
                final_norm=p, out=p, batch=1, n_new=1, layers=1, hidden=8, heads_q=2, heads_kv=1,
                head_dim=4, inter=8, ring=4, quant_tokens=0, group=1, value_group=4,
                precision=16, max_pos=4, eps=1e-6, scale=0.5, threads=1, small_threads=1,
                uncapped_stream_bytes=1 << 20)
    with pytest.raises(ValueError, match="length 0"):
        C.decode_layers_cpu(**args)
    with pytest.raises(ValueError, match="batch"):
        C.decode_layers_cpu(**{**args, "batch": 17})
    with pytest.raises(ValueError, match="n_new"):
        C.decode_layers_cpu(**{**args, "batch": 4, "n_new": 5})
    with pytest.raises(ValueError, match="bad sizes"):
        C.decode_layers_cpu(**{**args, "heads_q": 3, "heads_kv": 2})
    with pytest.raises(ValueError, match="precision"):
        C.decode_layers_cpu(**{**args, "precision": 2})
