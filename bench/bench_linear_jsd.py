"""linear_jsd: fused chunked student+teacher LM heads + generalized JSD (ours) vs the unfused
path (the reference: both models' full [T, V] logits, log_softmax, F.kl_div, which is what
a GKD / distillation trainer computes today), bf16, forward + backward, beta = 0.5.

Run: ``pytest bench/bench_linear_jsd.py --benchmark-only -s``.
Speed: pytest-benchmark groups per shape. Memory: each implementation runs forward +
backward in its own subprocess, which reports the growth of its resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs after the inputs exist; see
bench_linear_cross_entropy.py). Also: ``python bench/bench_linear_jsd.py --memory 512 1024
2048 151936`` prints both (T, student hidden, teacher hidden, V).
"""
from __future__ import annotations

import sys

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

import _memory

QWEN3_VOCAB = 151936
BETA = 0.5
# (tokens, student hidden, teacher hidden, vocab): the first is the CI smoke shape (its id
# contains "-1-1024-"); the second a CPU-sized distillation micro-batch
SHAPES = [(1, 1024, 2048, QWEN3_VOCAB), (256, 1024, 2048, QWEN3_VOCAB)]
IMPLS = ["qwen3_fast", "reference"]


def _weight(vocab, hidden, g):
    """[vocab, hidden] bf16 LM head: 4099 random rows repeated (drawing 150k x 2048 normals
    takes longer on a shared 2-core machine than the benchmark itself; the softmax still
    sees varied logits)."""
    base = (torch.randn(min(vocab, 4099), hidden, generator=g) * hidden ** -0.5)
    return base.to(torch.bfloat16)[torch.arange(vocab) % base.shape[0]]


def _inputs(tokens, hs, ht, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(tokens, hs, generator=g).to(torch.bfloat16).requires_grad_()
    sw = _weight(vocab, hs, g).requires_grad_()
    th = torch.randn(tokens, ht, generator=g).to(torch.bfloat16)
    tw = _weight(vocab, ht, g)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[::7] = -100
    return sh, sw, th, tw, y


def _fn(impl):
    if impl == "qwen3_fast":
        return lambda *a: ops.linear_jsd(*a, beta=BETA)
    return lambda *a: reference.linear_jsd(*a, beta=BETA)


@pytest.mark.parametrize("tokens,hs,ht,vocab", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_jsd_cpu(benchmark, impl, tokens, hs, ht, vocab):
    sh, sw, th, tw, y = _inputs(tokens, hs, ht, vocab)
    fn = _fn(impl)

    def step():
        sh.grad = sw.grad = None
        fn(sh, sw, th, tw, y).backward()

    benchmark.group = f"cpu-linear_jsd-fwd+bwd-bf16-T{tokens}-Hs{hs}-Ht{ht}-V{vocab}"
    benchmark.extra_info.update(impl=impl, device="cpu")
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)


# ------------------------------------------------------------------ peak memory
def measure(impl: str, tokens: int, hs: int, ht: int, vocab: int) -> float:
    """Peak resident growth (MiB) of one forward + backward, in this (fresh) process."""
    sh, sw, th, tw, y = _inputs(tokens, hs, ht, vocab)
    fn = _fn(impl)

    def warmup():  # first-call allocations
        fn(sh[:1], sw, th[:1], tw, y[:1]).backward()
        sh.grad = sw.grad = None

    return _memory.peak_growth_mib(warmup, lambda: fn(sh, sw, th, tw, y).backward())


def measure_in_subprocess(impl: str, tokens: int, hs: int, ht: int, vocab: int) -> float:
    return _memory.measure_in_subprocess('bench_linear_jsd', impl, tokens, hs, ht, vocab)


@pytest.mark.skipif(not _memory.HAVE_PROC, reason="needs Linux /proc")
@pytest.mark.parametrize("tokens,hs,ht,vocab", [(1, 1024, 2048, QWEN3_VOCAB)],
                         ids=["bf16-1-1024-2048-151936"])
def test_peak_memory_cpu(tokens, hs, ht, vocab):
    """Peak memory of ours vs unfused (printed); the full-size figure comes from --memory."""
    ours = measure_in_subprocess("qwen3_fast", tokens, hs, ht, vocab)
    ref = measure_in_subprocess("reference", tokens, hs, ht, vocab)
    print(f"\nlinear_jsd peak memory T={tokens} Hs={hs} Ht={ht} V={vocab}: ours {ours:.0f} "
          f"MiB, unfused {ref:.0f} MiB, ratio {ours / max(ref, 1e-9):.2f}")
    assert ours > 0 and ref > 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--memory":
        t, a, b, v = (int(x) for x in sys.argv[2:])
        ours = measure_in_subprocess("qwen3_fast", t, a, b, v)
        ref = measure_in_subprocess("reference", t, a, b, v)
        print(f"T={t} Hs={a} Ht={b} V={v} bf16 fwd+bwd peak growth: ours {ours:.0f} MiB, "
              f"unfused {ref:.0f} MiB, ratio {ours / ref:.3f}")
    else:
        sys.exit("usage: python bench/bench_linear_jsd.py --memory T Hs Ht V")
