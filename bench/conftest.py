"""Benchmark helpers: the machine's memory bandwidth (measured once per run) and a
summary table of ratios against each group's baseline, printed after the run.

Every benchmark records ``extra_info["bytes"]`` (the fewest bytes the op must move: each
input read once, each output written once) so the summary reports the fraction of the
measured bandwidth. Bandwidth: see bench/_bandwidth.py.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from _bandwidth import MEASURED, measure_bandwidth


def _keep_freed_memory_mapped() -> None:
    """Let glibc reuse freed large blocks instead of returning them to the kernel.

    Every op allocates fresh outputs; above glibc's mmap threshold (<= 32 MiB) each
    allocation is a new mapping whose first touch page-faults. On this project's CPU
    machines (Firecracker VMs) a first touch costs about 1 us per 4 KiB page, which would
    bury every memory-bound op, ours and the baselines alike, under page faults. Raising
    the thresholds (what jemalloc/tcmalloc setups in PyTorch CPU tuning guides achieve)
    applies to every implementation in the run, so ratios stay fair.
    """
    path = ctypes.util.find_library("c")
    if not path:
        return
    libc = ctypes.CDLL(path)
    if hasattr(libc, "mallopt"):
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


_keep_freed_memory_mapped()


@pytest.fixture(scope="session")
def bandwidth() -> float:
    return measure_bandwidth("cpu")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if bench.stats is None or not bench.stats.data:
            continue  # a benchmark that failed before its first round has nothing to compare
        groups.setdefault(bench.group or "", []).append(bench)
    tr = terminalreporter
    tr.section("qwen3_fast: speed ratios (baseline time / time) and bandwidth use")
    for device in sorted({b.extra_info.get('device', 'cpu') for b in session.benchmarks}):
        measure_bandwidth(device, again=True)
    for device, bw in MEASURED.items():
        tr.write_line(f"measured {device} memory bandwidth: {bw / 1e9:.1f} GB/s (best of copy "
                      "and read, start and end of the run; bench/_bandwidth.py)")
    tr.write_line(f"{'group':<44}{'impl':<14}{'median':>10}{'vs ref':>8}{'vs HF':>8}{'of BW':>8}")
    for group, benches in sorted(groups.items()):
        med = {b.extra_info.get("impl", b.name): b.stats.median for b in benches}
        for b in sorted(benches, key=lambda b: b.stats.median):
            impl = b.extra_info.get("impl", b.name)
            ref = med.get("reference")
            hf = med.get("hf_eager")
            nbytes = b.extra_info.get("bytes")
            bw = MEASURED.get(b.extra_info.get("device", "cpu"))
            frac = f"{nbytes / b.stats.median / bw:7.0%}" if nbytes and bw else "      -"
            tr.write_line(
                f"{group:<44}{impl:<14}{b.stats.median * 1e3:>8.3f}ms"
                f"{(ref / b.stats.median if ref else float('nan')):>8.2f}"
                f"{(hf / b.stats.median if hf else float('nan')):>8.2f}{frac:>8}")
