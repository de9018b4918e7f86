"""Peak resident memory of one piece of work, for the CPU memory benchmarks.

The peak is the growth of VmHWM over VmRSS once the process has warmed up (thread pools,
op registration, first-call allocations): ``/proc/self/clear_refs`` resets VmHWM to the
current RSS right before the work. Each figure comes from a fresh process
(:func:`measure_in_subprocess`) so one implementation's freed-but-kept pages never count
for the next. Linux only (``HAVE_PROC``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable

HAVE_PROC = os.path.exists("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth_mib(warmup: Callable[[], None], work: Callable[[], None]) -> float:
    """MiB the resident set grew to at its peak while `work` ran, after `warmup` ran."""
    warmup()
    rss = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    work()
    return (_status_kib("VmHWM") - rss) / 1024


def measure_in_subprocess(module: str, *args) -> float:
    """``bench/<module>.py``'s ``measure(*args)`` (a float) run in a fresh interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json; sys.path.insert(0, {here!r}); import {module} as b; "
            f"print(json.dumps(b.measure(*{args!r})))")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
