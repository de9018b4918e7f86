"""The device-side decode step (qwen3_fast/generate/graph_step.py) and LLM(cuda_graph=True).

CPU: the step equals the engine's eager decode token for token (a batch of mixed-length
prompts, a row that finishes and is dropped as the eager rollback drops it, the kernel and
the reference backends), the cache it leaves is the eager one, the engine's option gives
the eager outputs (greedy, per-row limits and stops, seeded sampling with penalties), and
torch.compile(fullgraph=True) traces the step without a graph break or a recompile across
steps: no host read of a per-step value is left in it. CUDA (run by bench/gpu_check.sh):
the captured graph replays under torch.cuda.set_sync_debug_mode("error") and equals eager.
"""
from __future__ import annotations

import pytest
import torch

from gen_testlib import one_thread, tiny_model_dir  # noqa: F401 (autouse fixture)
from qwen3_fast import LLM, SamplingParams
from qwen3_fast.generate import engine
from qwen3_fast.generate.engine import decode_step, prefill
from conftest import compiled_backends
from qwen3_fast.generate.graph_step import (DeviceDecodeStep, GraphDecodeRunner,
                                            SamplingTensors, unsupported_reason)
from qwen3_fast.generate.params import mode_defaults
from qwen3_fast.generate.sampling import BatchSampler
from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM
from qwen3_fast.ops import _backend, reference
from qwen3_fast.ops.flash_decode import _flash_decode_dense

HAS_CUDA = torch.cuda.is_available()
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [3, 4, 5, 6, 7], [20, 21]]
TEXTS = ["Hello there", "The quick brown fox jumps over the lazy dog.", "Numbers: 0 1 2"]
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_graph"))


def _params(temps, seed=None):
    return [SamplingParams(temperature=t, seed=seed).resolved(mode_defaults({}, True))
            for t in temps]


def _eager_and_device(model, steps: int, finish: dict, max_len: int = 40):
    """Decode PROMPTS greedily `steps` times twice: the engine's eager step (rollback of
    finished rows) and DeviceDecodeStep (active = 0 for them). finish: {row: step it
    finishes at}. Returns both token histories [steps, B] and both caches."""
    b = len(PROMPTS)
    caches, histories = [], []
    for device_side in (False, True):
        cache = model.new_cache(b, max_len)
        sampler = BatchSampler(_params([0.0] * b), PROMPTS, model.config.vocab_size,
                               model.device)
        tokens = sampler.sample(prefill(model, PROMPTS, cache))
        step = DeviceDecodeStep(model, cache) if device_side else None
        sampling = SamplingTensors(sampler)
        hist = []
        for i in range(steps):
            done = [1 if finish.get(r, steps) <= i else 0 for r in range(b)]
            if step is None:
                logits = decode_step(model, tokens, cache)
                if any(done):
                    cache.rollback(done)
                tokens = sampler.sample(logits)
            else:
                active = [1 - d for d in done]
                tokens = step(tokens.view(-1, 1),
                              torch.tensor(active, dtype=torch.int32, device=model.device),
                              sampling)
                cache.advance_host(active)
            hist.append(tokens.tolist())
        caches.append(cache)
        histories.append(hist)
    return histories, caches


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
def test_device_step_equals_eager_decode(model_dir, backend):
    model = Qwen3ForCausalLM.from_pretrained(model_dir)
    with _backend.use_backend(backend), torch.inference_mode():
        (eager, device), (ce, cd) = _eager_and_device(model, steps=10, finish={2: 4})
    assert device == eager
    assert cd.seq_lengths() == ce.seq_lengths() == [len(p) + 10 - (6 if r == 2 else 0)
                                                    for r, p in enumerate(PROMPTS)]
    assert cd.lengths.tolist() == cd.seq_lengths()
    # the same keys and values at live positions: bit-exact with the CPU kernel; the
    # reference attention sums over the whole cache (max_length, masked) instead of the
    # longest length, a different float32 summation order, hence the tolerance
    tol = dict(rtol=0, atol=0) if backend is None else dict(rtol=1e-4, atol=1e-5)
    for r, n in enumerate(cd.seq_lengths()):
        torch.testing.assert_close(cd.k[:, r, :, :n], ce.k[:, r, :, :n], **tol)
        torch.testing.assert_close(cd.v[:, r, :, :n], ce.v[:, r, :, :n], **tol)


def test_step_compiles_fullgraph_without_recompiles(model_dir):
    """The CPU proof that no data-dependent host read is left: a .item()/int() of a device
    value breaks a fullgraph trace, and a per-step host constant would recompile each step.
    (Seeded rows are left out: dynamo does not trace torch.Generator arguments; the CUDA
    graph handles them by registering the generators.)"""
    model = Qwen3ForCausalLM.from_pretrained(model_dir)
    b = len(PROMPTS)
    with torch.inference_mode():
        runs = []
        for compiled in (False, True):
            cache = model.new_cache(b, 40)
            sampler = BatchSampler(_params([0.0, 0.7, 0.0, 1.0]), PROMPTS,
                                   model.config.vocab_size, "cpu")
            tokens = sampler.sample(prefill(model, PROMPTS, cache))
            step = DeviceDecodeStep(model, cache)
            fn = torch.compile(step.__call__, fullgraph=True, backend="aot_eager") \
                if compiled else step.__call__
            sampling = SamplingTensors(sampler)
            active = torch.ones(b, dtype=torch.int32)
            hist = []
            try:
                for i in range(4):
                    tokens = fn(tokens.view(-1, 1), active, sampling)
                    cache.advance_host([1] * b)
                    hist.append(tokens.tolist())
                    if compiled and i == 0:
                        torch.compiler.set_stance("fail_on_recompile")
            finally:
                torch.compiler.set_stance("default")
                torch._dynamo.reset()
            assert cache.lengths.tolist() == [len(p) + 4 for p in PROMPTS]
            runs.append(hist)
    greedy = [0, 2]
    assert [[h[r] for r in greedy] for h in runs[1]] == [[h[r] for r in greedy] for h in runs[0]]
    vocab = model.config.vocab_size
    assert all(0 <= t < vocab for h in runs[1] for t in h)


def _no_eager_decode(*args, **kwargs):
    raise AssertionError("the eager decode step ran although the device-side step applies")


def test_engine_option_equals_eager(model_dir, monkeypatch):
    eager = LLM(model_dir, max_seq_len=64, max_batch_size=3)
    graph = LLM(model_dir, max_seq_len=64, max_batch_size=3, cuda_graph=True)
    greedy = SamplingParams(max_new_tokens=12, **GREEDY)
    free = eager.generate(TEXTS, greedy)
    stop_id = free[1].token_ids[3]
    cases = [
        greedy,
        # per-row limits, a stop token, a row hitting max_seq_len (prompt + 60 > 64)
        [SamplingParams(max_new_tokens=n, **GREEDY) for n in (3, 60, 9)],
        SamplingParams(max_new_tokens=10, stop_token_ids=[stop_id], **GREEDY),
        [SamplingParams(max_new_tokens=14, temperature=t, top_k=8, top_p=0.9, seed=s,
                        presence_penalty=0.5, repetition_penalty=1.3)
         for t, s in ((0.8, 1), (0.0, None), (1.1, 2))],
    ]
    for sp in cases:
        want = eager.generate(TEXTS, sp)
        with monkeypatch.context() as m:
            m.setattr(engine, "decode_step", _no_eager_decode)
            got = graph.generate(TEXTS, sp)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    # the thinking budget (forced tokens fed through the step) and streaming
    convs = [[{"role": "user", "content": "Think about it."}], [{"role": "user", "content": "Hi"}]]
    sp = SamplingParams(max_new_tokens=30, **GREEDY)
    want = eager.chat(convs, thinking_budget=5, sampling=sp)
    with monkeypatch.context() as m:
        m.setattr(engine, "decode_step", _no_eager_decode)
        got = graph.chat(convs, thinking_budget=5, sampling=sp)
        events = list(graph.chat(convs, sampling=sp, stream=True))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert any(o.thinking_budget_hit for o in got)
    streamed = ["".join(e.text for e in events if e.index == i) for i in range(2)]
    assert streamed == [o.text for o in eager.chat(convs, sampling=sp)]
    # a single prompt: another batch size, another cache and step
    with monkeypatch.context() as m:
        m.setattr(engine, "decode_step", _no_eager_decode)
        one = graph.generate(TEXTS[1], greedy)[0]
    assert one.token_ids == free[1].token_ids


def test_option_from_env_and_eager_fallbacks(model_dir, monkeypatch):
    monkeypatch.setenv("QWEN3_FAST_CUDA_GRAPH", "1")
    assert LLM(model_dir, max_seq_len=64).cuda_graph
    monkeypatch.setenv("QWEN3_FAST_CUDA_GRAPH", "0")
    assert not LLM(model_dir, max_seq_len=64).cuda_graph
    assert not LLM(model_dir, max_seq_len=64, cuda_graph=False)._graph_runner
    # the int8 (hierarchical) cache has no device-side step: the option decodes eagerly
    sp = SamplingParams(max_new_tokens=8, **GREEDY)
    want = LLM(model_dir, max_seq_len=64, kv_cache="int8").generate(TEXTS, sp)
    got = LLM(model_dir, max_seq_len=64, kv_cache="int8", cuda_graph=True).generate(TEXTS, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    model = Qwen3ForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="hierarchical cache"):
        DeviceDecodeStep(model, model.new_cache(1, 64, "hierarchical", group_size=16))


@pytest.mark.parametrize("device,backend",
                         [pytest.param("cpu", "reference", id="reference")] + compiled_backends())
def test_flash_decode_max_length_bound_equals_read_lengths(device, backend):
    """max_length (what the captured step passes instead of reading lengths.max()) sizes
    the work for the whole cache: the splits past a sequence's end are empty, same output."""
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 3, 8, 2, 700, 64
    q, k, v = (torch.randn(*shape, generator=gen).to(device)
               for shape in ((b, hq, 1, d), (b, hkv, t, d), (b, hkv, t, d)))
    lengths = torch.tensor([5, 300, 17], dtype=torch.int32, device=device)
    read = _flash_decode_dense(q, k, v, lengths, d ** -0.5, backend)
    bound = _flash_decode_dense(q, k, v, lengths, d ** -0.5, backend, t)
    torch.testing.assert_close(bound, read, rtol=1e-5, atol=1e-5)
    want = reference.flash_decode(q, k[:, :, :300], v[:, :, :300], lengths, d ** -0.5)
    torch.testing.assert_close(bound, want, rtol=1e-4, atol=1e-4)


def test_moe_models_are_left_to_the_eager_step():
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      model_type="qwen3_moe")
    model = Qwen3ForCausalLM(cfg)
    assert "MoE" in unsupported_reason(model, model.new_cache(1, 16))
    assert not GraphDecodeRunner(model).supports(model.new_cache(1, 16))
    with pytest.raises(ValueError, match="MoE"):
        DeviceDecodeStep(model, model.new_cache(1, 16))


# ------------------------------------------------------------------ CUDA (a lent GPU)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_captured_graph_replays_without_sync_and_equals_eager(model_dir):
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    b, steps = len(PROMPTS), 12
    with torch.inference_mode():
        (eager, _), (ce, _) = _eager_and_device(model, steps=steps, finish={2: 4})
        cache = model.new_cache(b, 40)
        sampler = BatchSampler(_params([0.0] * b), PROMPTS, model.config.vocab_size, "cuda")
        tokens = sampler.sample(prefill(model, PROMPTS, cache))
        bound = GraphDecodeRunner(model).bind(cache, sampler)
        hist = [bound.step(tokens, [True] * b)]  # captures the graph (host syncs allowed)
        assert bound.captured is not None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(1, steps):
                hist.append(bound.step(hist[-1], [i < 4 or r != 2 for r in range(b)]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = torch.stack(hist).tolist()
    assert got == eager
    assert cache.seq_lengths() == ce.seq_lengths() == cache.lengths.tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_engine_cuda_graph_equals_eager_cuda(model_dir):
    kw = dict(max_seq_len=64, max_batch_size=3, device="cuda", dtype=torch.bfloat16)
    eager, graph = LLM(model_dir, **kw), LLM(model_dir, cuda_graph=True, **kw)
    sampled = [SamplingParams(max_new_tokens=14, temperature=t, top_k=8, top_p=0.9, seed=s,
                              presence_penalty=0.5) for t, s in ((0.8, 1), (0.0, None), (1.1, 2))]
    for sp in ([SamplingParams(max_new_tokens=n, **GREEDY) for n in (3, 60, 9)], sampled):
        want = eager.generate(TEXTS, sp)
        got = graph.generate(TEXTS, sp)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert graph._graph_runner._graphs  # the decode ran as captured graphs
