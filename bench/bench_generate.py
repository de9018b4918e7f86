"""Generation benchmark: qwen3_fast.LLM against transformers' generate, same weights, one run.

Qwen3-0.6B-shaped random weights in bf16 (all 28 layers, hidden 1024, 16/8 heads, head_dim
128, intermediate 3072, vocab 151936, tied embeddings), prompts of 512 random tokens, 64 new
tokens (greedy, no early stop), batch 1 and 8, on the CPU. Each side runs its own public
generate call; prefill time is the time to the first new token (ours: the engine's own
timing; transformers: a streamer that notes when generate hands out the first new token)
and decode time is the rest, so both sides are measured the same way.

Groups ``generate-<case>``: the whole call (conftest prints the ratio "vs HF").
After the cases, the ``summary`` fixture prints prefill and decode tokens/s per side, our decode
speed-up over transformers, and the decode bandwidth use: per step every weight byte once
(the tied embedding once, as the LM head) plus the KV cache read at the current lengths,
over the measured memory bandwidth (bench/_bandwidth.py: the best of a copy and a read,
at the start and the end of the run).

The ``smoke-1-1024`` case (1 layer, hidden 1024, vocab 4096, prompt 32, 8 new tokens) is
what CI's smoke filter runs; the 0.6B cases take minutes on 2 cores.

    pytest bench/bench_generate.py --benchmark-only -s
"""
from __future__ import annotations

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen3_fast import LLM, SamplingParams  # noqa: E402
from qwen3_fast.model import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from qwen3_fast.tokenizer_train import build_test_tokenizer  # noqa: E402

from _bandwidth import measure_bandwidth  # noqa: E402

SMOKE = dict(num_hidden_layers=1, vocab_size=4096)
CASES = {  # id: (config overrides on the Qwen3-0.6B preset, prompt, new tokens, batch)
    "cpu-0.6B-28L-p512-n64-b1": ({}, 512, 64, 1),
    "cpu-0.6B-28L-p512-n64-b8": ({}, 512, 64, 8),
    "cpu-smoke-1-1024-p32-n8-b1": (SMOKE, 32, 8, 1),
    "cpu-smoke-1-1024-p32-n8-b2": (SMOKE, 32, 8, 2),
}
RESULTS: dict[tuple[str, str], dict] = {}


def _fill_random(model: Qwen3ForCausalLM, seed: int = 0) -> None:
    """Random N(0, 0.02) values, tiled from one 1M-element block: drawing 0.6B normals one by
    one takes about a minute here, and speed does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    block = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - start)
                flat[start:start + n] = block[:n]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, str] = {}

    def get(overrides: dict) -> str:
        key = repr(sorted(overrides.items()))
        if key not in made:
            cfg = Qwen3Config.from_name("Qwen3-0.6B", **overrides)
            with torch.device("meta"):
                model = Qwen3ForCausalLM(cfg, init_weights=False)
            model = model.to(torch.bfloat16).to_empty(device="cpu")
            model.tie_weights()
            _fill_random(model)
            path = tmp_path_factory.mktemp("qwen3-0.6b-shaped")
            model.save_pretrained(path)
            build_test_tokenizer(save_dir=path)  # LLM wants a tokenizer; prompts are ids
            made[key] = str(path)
        return made[key]

    return get


def _prompts(vocab: int, prompt: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, prompt), generator=g).tolist()


class _FirstTokenClock(transformers.generation.streamers.BaseStreamer):
    """Notes when transformers' generate hands out its first new token (the first put()
    after the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def _decode_bytes(model, cfg, prompt: int, new: int, batch: int) -> float:
    """Bytes a decode step must read, averaged over the steps: weights once + KV cache."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in
                                                         model.parameters()}.values())
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    mean_len = prompt + new / 2
    return weights + batch * kv_per_token * mean_len


@pytest.mark.parametrize("impl", ["qwen3_fast", "hf_eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_generate(benchmark, checkpoints, case, impl, request):
    overrides, prompt, new, batch = CASES[case]
    path = checkpoints(overrides)
    benchmark.group = f"generate-{case}"
    benchmark.extra_info.update(impl=impl, device="cpu")
    cfg = Qwen3Config.from_pretrained(path)
    prompts = _prompts(cfg.vocab_size, prompt, batch)
    times = []
    if impl == "qwen3_fast":
        llm = LLM(path, dtype=torch.bfloat16, max_batch_size=batch,
                  max_seq_len=prompt + new + 1)
        model = llm.model
        sp = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)

        def run():
            outs = llm.generate(prompts, sp)
            assert all(len(o.token_ids) == new for o in outs)
            times.append((outs[0].prefill_seconds, max(o.decode_seconds for o in outs)))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16).eval()
        ids = torch.tensor(prompts)

        def run():
            clock = _FirstTokenClock()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=new, min_new_tokens=new, streamer=clock,
                                     pad_token_id=0)
            end = time.perf_counter()
            assert out.shape == (batch, prompt + new)
            times.append((clock.first - t0, end - clock.first))

    rounds = 3 if "smoke" in case else 1
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1 if "smoke" in case else 0)
    pre = sorted(t[0] for t in times)[len(times) // 2]
    dec = sorted(t[1] for t in times)[len(times) // 2]
    RESULTS[(case, impl)] = dict(
        prefill_tok_s=batch * prompt / pre, decode_tok_s=batch * (new - 1) / dec,
        decode_step_s=dec / (new - 1), step_bytes=_decode_bytes(model, cfg, prompt, new, batch))
    benchmark.extra_info.update(RESULTS[(case, impl)])
    r = RESULTS[(case, impl)]
    _emit(request, [f"{case} {impl}: prefill {r['prefill_tok_s']:.1f} tok/s, decode "
                    f"{r['decode_tok_s']:.2f} tok/s"])


def _emit(request, lines) -> None:
    """Write lines to the terminal now (test and fixture output is otherwise captured)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module's cases: prefill/decode tokens/s, decode speed-up over transformers,
    decode bandwidth use (printed even under --benchmark-only)."""
    yield
    if not RESULTS:
        return
    bw = measure_bandwidth("cpu", again=True)
    lines = [f"memory bandwidth {bw / 1e9:.1f} GB/s (best of copy and read, start and end of "
             f"the run), {torch.get_num_threads()} threads",
             f"{'case':<30}{'impl':<12}{'prefill tok/s':>14}{'decode tok/s':>14}"
             f"{'decode vs HF':>14}{'of BW':>8}"]
    for (case, impl), r in sorted(RESULTS.items()):
        hf = RESULTS.get((case, "hf_eager"))
        ratio = r["decode_tok_s"] / hf["decode_tok_s"] if hf else float("nan")
        frac = r["step_bytes"] / r["decode_step_s"] / bw
        lines.append(f"{case:<30}{impl:<12}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.2f}"
                     f"{ratio:>14.2f}{frac:>8.0%}")
    _emit(request, [""] + lines)
