"""linear_logprobs: fused chunked LM head + log-softmax (ours) vs the unfused path users run
today (full logits -> fp32 log_softmax -> gather the targets, entropy from the same
log-probs; ops/reference.py, what RL trainers compute per token), bf16, forward + backward
through both outputs with random per-token upstream gradients (a GRPO loss with an entropy
term).

Run: ``pytest bench/bench_linear_logprobs.py --benchmark-only -s``.
Speed: pytest-benchmark groups per shape. Memory (issue 10, "fused vs unfused log-prob
memory at V = 151936"): MEASURED, each implementation runs forward + backward in its own
subprocess, which reports the growth of its resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs after the inputs exist; tracemalloc does not see torch's
allocations and torch keeps no CPU allocator statistics), printed next to an ANALYTIC
count of the bytes the dominant buffers need (:func:`analytic_bytes`), as a check that the
measurement sees what it should. Full size:
``python bench/bench_linear_logprobs.py --memory 2048 1024 151936``.
"""
from __future__ import annotations

import sys

import pytest
import torch

from qwen3_fast import ops
from qwen3_fast.ops import reference
from qwen3_fast.ops.linear_logprobs import backward_tiles, default_chunk_size

import _memory

QWEN3_VOCAB = 151936
TEMPERATURE = 0.9
# (tokens, hidden, vocab): the first is the CI smoke shape (id contains "-1-1024-")
SHAPES = [(1, 1024, QWEN3_VOCAB), (512, 1024, QWEN3_VOCAB)]
IMPLS = ["qwen3_fast", "unfused"]
MIB = 1 << 20


def _inputs(tokens, hidden, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(torch.bfloat16)
    w.requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[::7] = -100
    grads = (torch.randn(tokens, generator=g), torch.randn(tokens, generator=g) * 0.01)
    return h, w, y, grads


def _fn(impl):
    if impl == "qwen3_fast":
        return lambda h, w, y: ops.linear_logprobs(h, w, y, temperature=TEMPERATURE)
    return lambda h, w, y: reference.linear_logprobs(h, w, y, TEMPERATURE)


def _step(fn, h, w, y, grads):
    lp, ent = fn(h, w, y)
    torch.autograd.backward((lp, ent), grads)


@pytest.mark.parametrize("tokens,hidden,vocab", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_cpu(benchmark, impl, tokens, hidden, vocab):
    h, w, y, grads = _inputs(tokens, hidden, vocab)
    fn = _fn(impl)

    def step():
        h.grad = w.grad = None
        _step(fn, h, w, y, grads)

    benchmark.group = f"cpu-linear_logprobs-fwd+bwd-bf16-T{tokens}-H{hidden}-V{vocab}"
    benchmark.extra_info.update(impl=impl, device="cpu")
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)


# ------------------------------------------------------------------ peak memory
def analytic_bytes(impl: str, tokens: int, hidden: int, vocab: int) -> int:
    """Bytes of the dominant buffers at the peak of forward + backward (bf16 inputs).

    unfused: at the start of the backward autograd holds log p and p = exp(log p) [T, V]
    fp32 (saved by the entropy's product), and the first backward node produces two more
    [T, V] fp32 gradients before they are summed, plus grad_weight [V, H] bf16. This is a
    lower bound (the forward's bf16 and fp32 logits may overlap differently).
    qwen3_fast: grad_weight [V, H] bf16 (written slice by slice), grad_hidden [T, H] bf16
    and its fp32 accumulator, and one backward tile of the forward chunk's element count:
    the bf16 logits, two fp32 buffers (log p and p) and the bf16 gradient (plus a
    [slice, H] fp32 accumulator when T exceeds the backward's token block).
    """
    if impl == "unfused":
        return 4 * tokens * vocab * 4 + vocab * hidden * 2
    chunk = min(tokens, default_chunk_size(tokens, vocab))
    rows, cols = backward_tiles(tokens, vocab, chunk)
    extra = cols * hidden * 4 if tokens > rows else 0
    return vocab * hidden * 2 + tokens * hidden * 6 + rows * cols * (2 + 4 + 4 + 2) + extra


def measure(impl: str, tokens: int, hidden: int, vocab: int) -> float:
    """Peak resident growth (MiB) of one forward + backward, in this (fresh) process."""
    h, w, y, grads = _inputs(tokens, hidden, vocab)
    fn = _fn(impl)

    def warmup():  # first-call allocations
        _step(fn, h[:1], w, y[:1], (grads[0][:1], grads[1][:1]))
        h.grad = w.grad = None

    return _memory.peak_growth_mib(warmup, lambda: _step(fn, h, w, y, grads))


def measure_in_subprocess(impl: str, tokens: int, hidden: int, vocab: int) -> float:
    return _memory.measure_in_subprocess('bench_linear_logprobs', impl, tokens, hidden, vocab)


def report(tokens: int, hidden: int, vocab: int) -> tuple[float, float]:
    ours = measure_in_subprocess("qwen3_fast", tokens, hidden, vocab)
    ref = measure_in_subprocess("unfused", tokens, hidden, vocab)
    a_ours = analytic_bytes("qwen3_fast", tokens, hidden, vocab) / MIB
    a_ref = analytic_bytes("unfused", tokens, hidden, vocab) / MIB
    print(f"\nlinear_logprobs bf16 fwd+bwd T={tokens} H={hidden} V={vocab} peak memory growth: "
          f"ours {ours:.0f} MiB (analytic {a_ours:.0f}), unfused {ref:.0f} MiB (analytic "
          f"lower bound {a_ref:.0f}), ratio ours/unfused {ours / max(ref, 1e-9):.3f}")
    return ours, ref


@pytest.mark.skipif(not _memory.HAVE_PROC, reason="needs Linux /proc")
@pytest.mark.parametrize("tokens,hidden,vocab", [(1, 1024, QWEN3_VOCAB)],
                         ids=["bf16-1-1024-151936"])
def test_peak_memory_cpu(tokens, hidden, vocab):
    """Measured peak memory of ours vs unfused (printed); the full-size figure: --memory."""
    ours, ref = report(tokens, hidden, vocab)
    # both must at least hold grad_weight [V, H] bf16; a smaller figure means the
    # measurement missed the allocations
    floor = vocab * hidden * 2 / MIB
    assert ours >= 0.9 * floor and ref >= 0.9 * floor


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory":
        report(*(int(x) for x in sys.argv[2:]))
    else:
        sys.exit("usage: python bench/bench_linear_logprobs.py --memory T H V")
