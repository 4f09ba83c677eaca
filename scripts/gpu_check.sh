#!/usr/bin/env bash
# One prepared command for a lent GPU machine: build the extension with its CUDA kernels, run every CUDA test, run
# the GPU benchmarks, and write everything, with the machine and versions, under $OUT (issue 21).
#
#   scripts/gpu_check.sh           # full: sized for under 8 minutes on one H200
#   scripts/gpu_check.sh --quick   # under 3 minutes: the build, every CUDA test, a few benchmark rows
#
# It uses the machine's python3 and packages as they are (the GPU image: Python 3.12, torch 2.11 + CUDA 13.0,
# Triton 3.6, nvcc; no internet): no pip download, no venv. torchsde, which that image lacks, travels as wheels in
# .whl/ (`make gpu-wheels` here, then carry .whl with the call) and is installed into a temporary folder on
# PYTHONPATH; without them the torchsde tests and the official rows skip, and the summary says so.
#
# Stages, each timed and logged; a failed stage does not stop the later ones, the summary names it:
#   wheels   torchsde (and trampoline) from .whl/ into a temporary folder on PYTHONPATH
#   machine  GPU, driver, CPU, versions, commit                      -> $OUT/machine.md
#   build    python3 setup.py build_ext --inplace: CPU kernels, and CUDA kernels for the visible GPU
#   tests    pytest -m "cuda or triton" (every CUDA test; Triton on the GPU) -> $OUT/tests.xml
#   bench    benchmarks/bench_gpu.py, each call given the time left  -> $OUT/gpu.md, gpu.csv, gpu_step.csv
#   summary  one screen, printed last                                -> $OUT/summary.md
# Every stage's full output: $OUT/logs.tar.gz. At most 7 files in $OUT (the device tool returns 8).
#
# Environment: OUT (default out/gpu_check), PYTHON (default python3), GPU_CHECK_BUDGET_S (default 460 s, quick 165 s).
# Exit status 0 when every stage passed (or skipped for want of a GPU or of the wheels, not of time).
# Without a GPU (the torch 2.11 CPU simulation, README "GPU path"), the build is CPU-only, the CUDA tests and the
# benchmarks skip with a message saying so, and the rest runs as it will on the GPU machine.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
MODE=full
case "${1:-}" in
  "") ;;
  --quick) MODE=quick ;;
  -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (expected --quick or nothing)" >&2; exit 2 ;;
esac

export PY="${PYTHON:-python3}"
export OUT="${OUT:-$ROOT/out/gpu_check}"
export MODE ROOT
mkdir -p "$OUT"
rm -f "$OUT"/{machine.md,tests.xml,gpu.md,gpu.csv,gpu_step.csv,summary.md,logs.tar.gz}
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
export SITE="$LOGS/site"  # the carried wheels, installed here
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Time budget, all stages together (seconds): the targets are 8 and 3 minutes, less a margin for the summary and
# the slack of a first run. Each stage gets min(its cap, time left - what it leaves for the stages after it).
# GPU_CHECK_BUDGET_S overrides it (a slower machine, e.g. the 2-core CPU simulation), scaling every stage's share.
START=$(date +%s)
if [ "$MODE" = quick ]; then DEFAULT_TOTAL=165; else DEFAULT_TOTAL=460; fi
TOTAL=${GPU_CHECK_BUDGET_S:-$DEFAULT_TOTAL}
export DEADLINE=$((START + TOTAL))
STAGES="$LOGS/stages.tsv"
: >"$STAGES"

# run_stage NAME CAP_S LEAVE_S: runs the function stage_NAME under `timeout`, its output to the terminal and to
# $LOGS/NAME.log; records NAME, status (ok | FAIL rc N | timeout after N s | skipped), seconds and the note the stage
# wrote to $LOGS/NAME.note.
run_stage() {
  local name=$1 cap=$(($2 * TOTAL / DEFAULT_TOTAL)) leave=$(($3 * TOTAL / DEFAULT_TOTAL))
  local limit=$((DEADLINE - $(date +%s) - leave))
  ((limit > cap)) && limit=$cap
  if ((limit < 5)); then
    printf '%s\tskipped\t0\tno time left in the %s s budget\n' "$name" "$TOTAL" >>"$STAGES"
    return
  fi
  echo "=== $name (at $(($(date +%s) - START)) s; limit $limit s) ==="
  local t0 rc status
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" bash -c "stage_$name" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="timeout after $limit s" ;;
    *) status="FAIL rc $rc" ;;
  esac
  [ -f "$LOGS/$name.status" ] && [ "$rc" = 0 ] && status=$(cat "$LOGS/$name.status")
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$(cat "$LOGS/$name.note" 2>/dev/null)" \
    >>"$STAGES"
}
export LOGS

gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true; }
export -f gpu_count

stage_machine() {
  {
    echo "# Machine and versions (gpu_check.sh $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "- Commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git)')"
    echo "- Kernel: $(uname -srm); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
    echo "- nvcc: $(nvcc --version 2>/dev/null | grep -i release || echo 'not found')"
    "$PY" benchmarks/bench_gpu.py --machine
    echo
    echo '```'
    nvidia-smi 2>&1 || echo "nvidia-smi: not available (no GPU driver)"
    echo '```'
  } >"$OUT/machine.md"
  cat "$OUT/machine.md"
  grep -m1 '^- GPU' "$OUT/machine.md" | sed 's/^- //' >"$LOGS/machine.note"
}

stage_wheels() {
  if "$PY" -c "import torchsde" 2>/dev/null; then
    "$PY" -c "import torchsde; print('torchsde', torchsde.__version__, 'already installed')" | tee "$LOGS/wheels.note"
    return 0
  fi
  shopt -s nullglob
  local wheels=("$ROOT"/.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in .whl/ (make gpu-wheels, and carry .whl): the torchsde tests and the official rows skip" \
      | tee "$LOGS/wheels.note"
    echo "skipped" >"$LOGS/wheels.status"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || return 1
  "$PY" -c "import torchsde; print('torchsde', torchsde.__version__, 'from the carried wheels')" \
    | tee "$LOGS/wheels.note"
}

stage_build() {
  local gpus
  gpus=$(gpu_count)
  if ((gpus > 0)); then
    export FORCE_CUDA=1  # setup.py then fails with the reason rather than quietly building CPU-only
    echo "build: $gpus GPU(s) visible: CPU kernels and CUDA kernels for the visible GPU's architecture"
  else
    export DIFFPURE_FAST_NO_CUDA=1
    echo "build: no GPU visible: CPU kernels only (the CUDA tests and benchmarks below skip)"
  fi
  MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" - "$gpus" <<'PYEOF'
import os
import sys

import torch

from diffpure_fast.ops import _ext, default_impl_name

gpus = int(sys.argv[1])
cpu, cuda = _ext.has_kernel("CPU"), _ext.has_kernel("CUDA")
note = f"extension: CPU kernels {'built' if cpu else 'MISSING'}, CUDA kernels {'built' if cuda else 'not built'}"
if torch.cuda.is_available():
    note += f"; the GPU runs the {default_impl_name(torch.device('cuda'))} fused step"
print(note)
with open(os.path.join(os.environ["LOGS"], "build.note"), "w") as f:
    f.write(note)
sys.exit(0 if cpu and (cuda or gpus == 0) else 1)
PYEOF
}

stage_tests() {
  local extra=()
  # Several workers compile Triton kernels and initialise CUDA in parallel (16 cores on the H200 machine); the
  # per-test timeout turns a hang into one failure instead of the stage's timeout.
  if "$PY" -c "import xdist" 2>/dev/null; then
    local n
    n=$(nproc)
    extra+=(-n "$((n < 8 ? n : 8))")
  fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout 150); fi
  local gpus
  gpus=$(gpu_count)
  ((gpus == 0)) && echo "tests: no GPU visible: every cuda-marked test skips (\"needs a CUDA GPU\"); the" \
    "triton-marked ones run under TRITON_INTERPRET on CPU"
  "$PY" -m pytest -m "cuda or triton" -q -rfEs -p no:cacheprovider --junitxml="$OUT/tests.xml" "${extra[@]}"
}

bench() {  # bench_gpu.py with --append and the time left, less a margin for the later stages
  local budget=$((DEADLINE - $(date +%s) - 15))
  ((budget < 10)) && { echo "bench: no time left for: $*"; return 0; }
  "$PY" benchmarks/bench_gpu.py --output "$OUT/gpu.md" --append --budget-s "$budget" "$@"
}
export -f bench

stage_bench() {
  if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "bench: no CUDA GPU visible: skipped (bench_gpu.py measures nothing without one)" | tee "$LOGS/bench.note"
    echo "skipped" >"$LOGS/bench.status"
    return 0
  fi
  local rc=0 no_grad="eager,cuda_graph,bf16,bf16_graph,official"
  # Every row without a compile first, the compiles last: a compile costs the most, and is what a budget drops.
  if [ "$MODE" = quick ]; then
    bench --parts step --step-sizes 64M --repeats 2 || rc=1
    bench --parts purify --nets ncsnpp --batches 1,64 --steps 1:20,64:5 --repeats 2 \
      --variants eager,cuda_graph,bf16,official,full,full_graph || rc=1
    bench --parts purify --nets adm --batches 1 --steps 5 --repeats 2 --variants eager,cuda_graph,bf16 || rc=1
  else
    bench --parts step || rc=1
    bench --parts purify --nets ncsnpp --batches 1,64 --steps 1:100,64:20 --variants "$no_grad,full,full_graph" \
      || rc=1
    bench --parts purify --nets adm --batches 1 --steps 20 --variants "$no_grad,full" || rc=1
    # ADM at batch 64: 143 TFLOP per step, so 2 steps; its exact gradient's activations would not fit (not run).
    bench --parts purify --nets adm --batches 64 --steps 2 --variants "$no_grad" || rc=1
    bench --parts purify --nets ncsnpp --batches 1,64 --steps 1:100,64:20 --variants compiled || rc=1
    bench --parts purify --nets adm --batches 1 --steps 20 --variants compiled || rc=1
  fi
  return $rc
}

export -f stage_machine stage_wheels stage_build stage_tests stage_bench

# Stage caps and what each leaves for the stages after it (seconds).
# wheels first: the machine stage reports the torchsde it finds.
if [ "$MODE" = quick ]; then
  run_stage wheels 30 140
  run_stage machine 30 130
  run_stage build 150 70
  run_stage tests 90 30
  run_stage bench 120 5
else
  run_stage wheels 30 420
  run_stage machine 30 410
  run_stage build 240 300
  run_stage tests 180 150
  run_stage bench 400 5
fi

"$PY" "$ROOT/scripts/gpu_check_summary.py" --mode "$MODE" --stages "$STAGES" --out "$OUT" \
  --seconds "$(($(date +%s) - START))" --budget "$TOTAL" >"$LOGS/summary.log" 2>&1
summary_rc=$?
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" --exclude=./site . 2>/dev/null
cat "$LOGS/summary.log"
exit $summary_rc
