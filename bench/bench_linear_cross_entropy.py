"""linear_cross_entropy: fused chunked LM head + CE (ours) vs the unfused logits + F.cross_entropy
(the reference, which is what HF's ForCausalLMLoss computes), bf16, forward + backward.

Run: ``pytest bench/bench_linear_cross_entropy.py --benchmark-only -s``.
Speed: pytest-benchmark groups per shape. Memory: each implementation runs forward +
backward in its own subprocess, which reports the growth of its resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs after the inputs exist) — tracemalloc
does not see torch's allocations and torch has no CPU allocator statistics. Also:
``python bench/bench_linear_cross_entropy.py --memory 4096 1024 151936`` prints both.
"""
from __future__ import annotations

import sys

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference

import _memory

QWEN3_VOCAB = 151936
# (tokens, hidden, vocab): the first is the CI smoke shape (id contains "-1-1024-")
SHAPES = [(1, 1024, QWEN3_VOCAB), (512, 1024, QWEN3_VOCAB)]
IMPLS = ["qwen3_fast", "reference"]


def _inputs(tokens, hidden, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(torch.bfloat16)
    w.requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[::7] = -100
    return h, w, y


def _fn(impl):
    if impl == "qwen3_fast":
        return ops.linear_cross_entropy
    return lambda h, w, y: reference.linear_cross_entropy(h, w, y)


@pytest.mark.parametrize("tokens,hidden,vocab", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_cpu(benchmark, impl, tokens, hidden, vocab):
    h, w, y = _inputs(tokens, hidden, vocab)
    fn = _fn(impl)

    def step():
        h.grad = w.grad = None
        fn(h, w, y).backward()

    benchmark.group = f"cpu-linear_cross_entropy-fwd+bwd-bf16-T{tokens}-H{hidden}-V{vocab}"
    benchmark.extra_info.update(impl=impl, device="cpu")
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)


# ------------------------------------------------------------------ peak memory
def measure(impl: str, tokens: int, hidden: int, vocab: int) -> float:
    """Peak resident growth (MiB) of one forward + backward, in this (fresh) process."""
    h, w, y = _inputs(tokens, hidden, vocab)
    fn = _fn(impl)

    def warmup():  # first-call allocations (thread pools, op registration)
        fn(h[:1], w, y[:1]).backward()
        h.grad = w.grad = None

    return _memory.peak_growth_mib(warmup, lambda: fn(h, w, y).backward())


def measure_in_subprocess(impl: str, tokens: int, hidden: int, vocab: int) -> float:
    return _memory.measure_in_subprocess('bench_linear_cross_entropy', impl, tokens, hidden, vocab)


@pytest.mark.skipif(not _memory.HAVE_PROC, reason="needs Linux /proc")
@pytest.mark.parametrize("tokens,hidden,vocab", [(1, 1024, QWEN3_VOCAB)],
                         ids=["bf16-1-1024-151936"])
def test_peak_memory_cpu(tokens, hidden, vocab):
    """Peak memory of ours vs unfused (printed); the full-size figure comes from --memory."""
    ours = measure_in_subprocess("qwen3_fast", tokens, hidden, vocab)
    ref = measure_in_subprocess("reference", tokens, hidden, vocab)
    print(f"\nlinear_cross_entropy peak memory T={tokens} H={hidden} V={vocab}: "
          f"ours {ours:.0f} MiB, unfused {ref:.0f} MiB, ratio {ours / max(ref, 1e-9):.2f}")
    assert ours > 0 and ref > 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory":
        t, hd, v = (int(x) for x in sys.argv[2:])
        ours = measure_in_subprocess("qwen3_fast", t, hd, v)
        ref = measure_in_subprocess("reference", t, hd, v)
        print(f"T={t} H={hd} V={v} bf16 fwd+bwd peak growth: ours {ours:.0f} MiB, unfused "
              f"{ref:.0f} MiB, ratio {ours / ref:.3f}")
    else:
        sys.exit("usage: python bench/bench_linear_cross_entropy.py --memory T H V")
