"""One training step (forward, backward, AdamW) of a Qwen3-0.6B-shaped model cut to 2 layers,
ours vs transformers' Qwen3ForCausalLM + its loss, the same weights, CPU.

Precision: fp32 master weights under bf16 autocast for both (what ``precision: bf16`` in a
training config does). Ours: qwen3_fast kernels and the fused LM head + CE
(``return_logits=False``: no [T, 151936] logits); HF: eager modules, logits + CE.

Run: ``pytest bench/bench_train.py --benchmark-only -s`` (tokens/s = tokens per step /
median step time). Peak memory: ``python bench/bench_train.py --memory 2048`` runs each
implementation in its own process and reports the growth of its resident-set high-water
mark over one step (VmHWM reset through /proc/self/clear_refs once the model, optimizer
state and batch exist; torch has no CPU allocator statistics and tracemalloc sees nothing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (batch, seq, layers): the first is the CI smoke shape (id contains "-1-1024-")
SHAPES = [(1, 1024, 1), (1, 2048, 2)]
IMPLS = ["qwen3_fast", "hf_eager"]


def build(impl: str, layers: int, seed: int = 0):
    """(model, step function) for `impl`, both from the same random Qwen3-0.6B weights."""
    from qwen3_fast.model import Qwen3ForCausalLM
    from qwen3_fast.model.config import Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config.from_name("Qwen3-0.6B", num_hidden_layers=layers)
    ours = Qwen3ForCausalLM(cfg)
    if impl == "qwen3_fast":
        model = ours
    else:
        import transformers

        hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_dict().items()
                                             if k not in ("architectures", "rope_parameters")})
        model = transformers.Qwen3ForCausalLM(hf_cfg)
        missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        model.tie_weights()
        del ours
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if impl == "qwen3_fast":
                loss = model(ids, labels=ids, return_logits=False).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def _batch(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 151669, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch,seq,layers", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_cpu(benchmark, impl, batch, seq, layers):
    if impl == "hf_eager":
        pytest.importorskip("transformers")
    _model, step = build(impl, layers)
    ids = _batch(batch, seq)
    benchmark.group = f"cpu-train_step-0.6B-{layers}L-B{batch}-S{seq}-bf16autocast"
    benchmark.extra_info.update(impl=impl, device="cpu", tokens=batch * seq)
    benchmark.pedantic(step, args=(ids,), rounds=2, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None and benchmark.stats.stats.median:
        tok_s = batch * seq / benchmark.stats.stats.median
        benchmark.extra_info["tok_per_s"] = tok_s
        print(f"\n{impl}: {tok_s:.0f} tokens/s (B={batch}, S={seq}, {layers} layers)")


def _hwm_rss_kib() -> tuple[int, int]:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                vals[line.split(":")[0]] = int(line.split()[1])
    return vals["VmHWM"], vals["VmRSS"]


def measure(impl: str, batch: int, seq: int, layers: int) -> dict:
    """In this (fresh) process: peak resident growth (MiB) of one step after a warm-up."""
    import time

    _model, step = build(impl, layers)
    ids = _batch(batch, seq)
    step(ids)  # optimizer state and first-call allocations exist from here on
    _, rss = _hwm_rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    loss = step(ids)
    dt = time.perf_counter() - t0
    hwm, _ = _hwm_rss_kib()
    return {"peak_mib": (hwm - rss) / 1024, "step_s": dt, "tok_per_s": batch * seq / dt,
            "loss": float(loss)}


def measure_in_subprocess(impl: str, batch: int, seq: int, layers: int) -> dict:
    code = ("import sys, json; sys.path.insert(0, %r); import bench_train as b; "
            "print(json.dumps(b.measure(%r, %d, %d, %d)))"
            % (os.path.dirname(os.path.abspath(__file__)), impl, batch, seq, layers))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("batch,seq,layers", SHAPES[:1], ids=["bf16-1-1024-1"])
def test_train_peak_memory_cpu(batch, seq, layers):
    pytest.importorskip("transformers")
    ours = measure_in_subprocess("qwen3_fast", batch, seq, layers)
    hf = measure_in_subprocess("hf_eager", batch, seq, layers)
    print(f"\ntrain step peak memory growth B={batch} S={seq} {layers}L: ours "
          f"{ours['peak_mib']:.0f} MiB, HF {hf['peak_mib']:.0f} MiB "
          f"(ratio {ours['peak_mib'] / hf['peak_mib']:.2f}); losses {ours['loss']:.4f} / "
          f"{hf['loss']:.4f}")
    assert abs(ours["loss"] - hf["loss"]) < 0.05 * abs(hf["loss"])  # same weights, same task


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--memory":
        seq = int(sys.argv[2])
        layers = int(sys.argv[3]) if len(sys.argv) == 4 else 2
        res = {impl: measure_in_subprocess(impl, 1, seq, layers) for impl in IMPLS}
        for impl, r in res.items():
            print(f"{impl:<11} S={seq} {layers}L: {r['tok_per_s']:.0f} tok/s, step "
                  f"{r['step_s']:.2f} s, peak growth {r['peak_mib']:.0f} MiB, loss "
                  f"{r['loss']:.4f}")
        a, b = res["qwen3_fast"], res["hf_eager"]
        print(f"ratios ours/HF: speed {a['tok_per_s'] / b['tok_per_s']:.2f}x, "
              f"peak memory {a['peak_mib'] / b['peak_mib']:.2f}x")
    else:
        sys.exit("usage: python bench/bench_train.py --memory SEQ [LAYERS]")
