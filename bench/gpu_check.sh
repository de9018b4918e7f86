#!/usr/bin/env bash
# The one script a lent GPU machine runs (see README "GPU check"), in the repository root:
#   bash bench/gpu_check.sh            # writes build.log, info.json, tests.{log,xml},
#                                      # bench.{log,json}, summary.json to $OUT
# 1. installs CUTLASS headers from a carried wheel (wheels/nvidia_cutlass-*.whl, an ignored
#    folder: `pip download --no-deps -d wheels nvidia-cutlass` here, then carry "wheels"),
# 2. builds the package with the machine's own torch (pip --no-build-isolation; the GPU
#    machine has no registry), CUDA kernels for sm_90a unless QWEN3_FAST_CUDA_ARCHS says,
# 3. runs the CUDA-marked tests and the CUDA benchmarks,
# 4. writes a JSON summary (bench/gpu_check_summary.py) to commit under bench/results/.
# Budget: fits one `run` call of timeout_s 540 (build ~1.7 min on 16 cores; tests capped at
# 230 s, since a first run compiles every Triton kernel; benchmarks at 150 s); pass
# GIT_COMMIT=$(git rev-parse HEAD) for the record.
# Without a GPU it is a dry run: the same steps, the GPU tests and benchmarks skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

if compgen -G "wheels/nvidia_cutlass-*.whl" >/dev/null; then
  log "installing CUTLASS headers from $(ls wheels/nvidia_cutlass-*.whl)"
  $PY -m pip install -q --no-deps --no-index wheels/nvidia_cutlass-*.whl || log "cutlass wheel install failed"
fi

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export QWEN3_FAST_CUDA=${QWEN3_FAST_CUDA:-1}
  export QWEN3_FAST_CUDA_ARCHS=${QWEN3_FAST_CUDA_ARCHS:-90a}
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
else
  log "no GPU: dry run"
fi

log "building (QWEN3_FAST_CUDA=${QWEN3_FAST_CUDA:-auto} archs=${QWEN3_FAST_CUDA_ARCHS:-default})"
start=$SECONDS
$PY -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1
build_rc=$?
build_s=$((SECONDS - start))
log "build rc=$build_rc in ${build_s}s"

$PY -m qwen3_fast.info --json >"$OUT/info.json" 2>>"$OUT/build.log"
$PY -m qwen3_fast.info || true

test_rc=99
bench_rc=99
if [ "$build_rc" -eq 0 ]; then
  log "CUDA tests"
  timeout 230 $PY -m pytest python_tests -m cuda -q -p no:cacheprovider -o addopts="" -rfE --tb=short \
    --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
  test_rc=$?
  tail -n 15 "$OUT/tests.log"
  log "CUDA benchmarks"
  timeout 150 $PY -m pytest bench -m cuda --benchmark-only -q -p no:cacheprovider -o addopts="" \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median >"$OUT/bench.log" 2>&1
  bench_rc=$?
  grep -A200 "speed ratios" "$OUT/bench.log" | head -n 80
fi

$PY bench/gpu_check_summary.py --out "$OUT" --build-rc "$build_rc" --build-seconds "$build_s" \
  --test-rc "$test_rc" --bench-rc "$bench_rc" >"$OUT/summary.json"
cat "$OUT/summary.json" | head -c 3000
echo
log "done: build=$build_rc tests=$test_rc bench=$bench_rc"
# pytest's 5 (nothing collected/selected) is the dry run's normal outcome without a GPU.
[ "$build_rc" -eq 0 ] && { [ "$test_rc" -eq 0 ] || [ "$test_rc" -eq 5 ]; }
