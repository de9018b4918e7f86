"""Summarize a bench/gpu_check.sh run as one JSON document (printed to stdout).

Reads $OUT/info.json, tests.xml (JUnit from pytest) and bench.json (pytest-benchmark)
and reports: what was built, test counts and failures, and per benchmark group the
median time of each implementation, its speedup over the reference and HF eager, and
its fraction of the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import xml.etree.ElementTree as ET


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tests_summary(path: str) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"no test report: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:50]
    return counts


def bench_summary(path: str) -> dict:
    data = _load_json(path)
    if not data:
        return {}
    groups: dict[str, dict] = {}
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info", {})
        groups.setdefault(b["group"], {})[extra.get("impl", b["name"])] = {
            "median_s": b["stats"]["median"], "bytes": extra.get("bytes"),
            "bandwidth": extra.get("bandwidth")}
    out = {}
    for group, impls in sorted(groups.items()):
        ref = impls.get("reference", {}).get("median_s")
        hf = impls.get("hf_eager", {}).get("median_s")
        row = {}
        for impl, r in impls.items():
            t = r["median_s"]
            row[impl] = {
                "median_ms": round(t * 1e3, 4),
                "vs_reference": round(ref / t, 3) if ref else None,
                "vs_hf_eager": round(hf / t, 3) if hf else None,
                "fraction_of_bandwidth": round(r["bytes"] / t / r["bandwidth"], 3)
                if r.get("bytes") and r.get("bandwidth") else None,
            }
        out[group] = row
    return {"machine": data.get("machine_info", {}).get("cpu", {}).get("brand_raw"),
            "groups": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--build-rc", type=int, required=True)
    p.add_argument("--build-seconds", type=int, default=0)
    p.add_argument("--test-rc", type=int, required=True)
    p.add_argument("--bench-rc", type=int, required=True)
    a = p.parse_args()
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("GIT_COMMIT", ""),
        "build": {"rc": a.build_rc, "seconds": a.build_seconds},
        "info": _load_json(os.path.join(a.out, "info.json")),
        "tests": {"rc": a.test_rc, **tests_summary(os.path.join(a.out, "tests.xml"))},
        "bench": {"rc": a.bench_rc, **bench_summary(os.path.join(a.out, "bench.json"))},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
