#!/usr/bin/env bash
# Compile every csrc/**/*.cu with nvcc -c for the architectures setup.py builds without a GPU (sm_80, sm_90 and
# compute_90 PTX: DEFAULT_ARCH_LIST in diffpure_fast/_build.py), with the C++ standard that torch's extension builder
# uses (_build.cxx_standard), against the venv's torch headers (PYTHON=... picks another torch): catches CUDA build
# errors on a machine without a GPU. ptxas -v then reports every kernel's registers, stack frame and spills: the
# check fails on any register spill, or on more registers than the launch bound (256 threads a block) allows.
# Objects go to a temporary directory that is removed on exit.
#
#   scripts/check_cuda_compile.sh            # PYTHON=.venv/bin/python, NVCC=nvcc unless set
#   scripts/check_cuda_compile.sh --ptxas-report LOG   # only check a saved ptxas -v log
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NVCC="${NVCC:-nvcc}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# Registers a thread may use under __launch_bounds__(256): an SM's 65536 registers over one 256-thread block
# (256), capped by the 255 a thread can address.
MAX_REGISTERS=$(( 65536 / 256 < 255 ? 65536 / 256 : 255 ))

# One line per (kernel, machine-code architecture) of ptxas -v's report; exit status 1 on any spill, on more
# registers than MAX_REGISTERS, or when the report has no kernel at all.
ptxas_report() {
  awk -v max_regs="$MAX_REGISTERS" '
    /Compiling entry function/ { split($0, q, "\047"); fn = q[2]; arch = q[4] }
    /bytes stack frame/ { stack = $1; stores = $5; loads = $9 }
    /Used [0-9]+ registers/ && fn != "" {
      for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
      bad = (stores + 0 > 0 || loads + 0 > 0 || regs + 0 > max_regs)
      printf "  %s %-6s %3d registers, %3d bytes stack, %d/%d bytes spill stores/loads  %s\n",
             bad ? "FAIL" : "ok  ", arch, regs, stack, stores, loads, fn
      if (bad) status = 1
      kernels++
      fn = ""; stack = 0; stores = 0; loads = 0
    }
    END { exit (status || kernels == 0) }'
}

# --ptxas-report LOG: only summarise and check a saved `ptxas -v` log (how tests/test_build.py checks the checker).
if [ "${1:-}" = "--ptxas-report" ]; then
  ptxas_report <"$2"
  exit $?
fi

command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: $NVCC not found" >&2; exit 2; }

mapfile -t INCLUDES < <("$PYTHON" -c "from torch.utils.cpp_extension import include_paths
for p in include_paths(): print('-I' + p)")
PY_INCLUDE="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
CXX11_ABI="$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
TORCH_VERSION="$("$PYTHON" -c "import torch; print(torch.__version__)")"

# setup.py's TORCH_CUDA_ARCH_LIST without a GPU, turned into -gencode flags as torch.utils.cpp_extension does:
# "9.0+PTX" is sm_90 machine code plus compute_90 PTX. _build.py is loaded by path (no package import).
mapfile -t GENCODE < <("$PYTHON" -c "
import importlib.util, sys
spec = importlib.util.spec_from_file_location('build_rules', sys.argv[1])
rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rules)
for arch in rules.DEFAULT_ARCH_LIST.split(';'):
    num = arch.removesuffix('+PTX').replace('.', '')
    print(f'-gencode=arch=compute_{num},code=sm_{num}')
    if arch.endswith('+PTX'):
        print(f'-gencode=arch=compute_{num},code=compute_{num}')
" "$ROOT/diffpure_fast/_build.py")
ARCHS="$(printf '%s\n' "${GENCODE[@]}" | sed 's/.*code=//' | paste -sd, -)"

# The C++ standard of this torch's extension builds (torch 2.11: c++17, torch 2.13: c++20), as _build.py reads it
# from torch.utils.cpp_extension; CXX_STD=c++NN overrides it.
CXX_STD="${CXX_STD:-$("$PYTHON" -c "
import importlib.util, inspect, sys
import torch.utils.cpp_extension as ext
spec = importlib.util.spec_from_file_location('build_rules', sys.argv[1])
rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rules)
print(rules.cxx_standard(inspect.getsource(ext)))
" "$ROOT/diffpure_fast/_build.py")}"

# The flags torch.utils.cpp_extension gives a CUDAExtension, plus setup.py's (--fmad=false: see csrc/sde_step.h).
FLAGS=("-std=$CXX_STD" -O3 --fmad=false --expt-relaxed-constexpr -Xcompiler -fPIC
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__
       "${GENCODE[@]}" -Xptxas -v
       "-I$ROOT/csrc" "${INCLUDES[@]}" "-I$PY_INCLUDE")

# A CPU-only torch wheel ships the c10/cuda headers but not the configure-generated cuda_cmake_macros.h; the
# macro below is c10's own switch for builds without that file (it only sets export visibility).
TORCH_INCLUDE="$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(include_paths()[0])")"
if [ ! -f "$TORCH_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  echo "note: CPU-only torch headers (no c10/cuda/impl/cuda_cmake_macros.h): adding -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
  FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

mapfile -t SOURCES < <(find "$ROOT/csrc" -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no .cu files under csrc/" >&2
  exit 1
fi

demangle=cat
if command -v c++filt >/dev/null; then demangle=c++filt; fi

status=0
for src in "${SOURCES[@]}"; do
  rel="${src#"$ROOT"/}"
  obj="$OUT/$(echo "$rel" | tr '/' '_').o"
  log="$OUT/$(echo "$rel" | tr '/' '_').log"
  start=$(date +%s)
  if ! "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj" 2>"$log"; then
    cat "$log" >&2
    echo "FAIL  $rel" >&2
    status=1
    continue
  fi
  echo "ok    $rel ($ARCHS, $CXX_STD, torch $TORCH_VERSION) in $(( $(date +%s) - start )) s"
  # Compiler warnings, without ptxas -v's report (summarised below).
  grep -v -e '^ptxas info' -e 'bytes stack frame' "$log" >&2 || true
  # Demangled kernel names without their argument lists (the template arguments say which instantiation).
  if ! ptxas_report <"$log" | $demangle | sed 's/>(.*$/>/'; then
    echo "FAIL  $rel: a kernel spills registers, uses more than $MAX_REGISTERS, or ptxas reported none" >&2
    status=1
  fi
done
exit "$status"
