#!/usr/bin/env bash
# Compile every csrc/**/*.cu with nvcc -c for sm_80 and sm_90 against the venv's torch headers: catches CUDA build
# errors on a machine without a GPU. Objects go to a temporary directory that is removed on exit.
#
#   scripts/check_cuda_compile.sh            # PYTHON=.venv/bin/python, NVCC=nvcc unless set
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NVCC="${NVCC:-nvcc}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: $NVCC not found" >&2; exit 2; }

mapfile -t INCLUDES < <("$PYTHON" -c "from torch.utils.cpp_extension import include_paths
for p in include_paths(): print('-I' + p)")
PY_INCLUDE="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
CXX11_ABI="$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"

# The flags torch.utils.cpp_extension gives a CUDAExtension, plus setup.py's (--fmad=false: see csrc/sde_step.h).
FLAGS=(-std=c++20 -O3 --fmad=false --expt-relaxed-constexpr -Xcompiler -fPIC
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
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

status=0
for src in "${SOURCES[@]}"; do
  rel="${src#"$ROOT"/}"
  obj="$OUT/$(echo "$rel" | tr '/' '_').o"
  start=$(date +%s)
  if "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj"; then
    echo "ok    $rel (sm_80, sm_90) in $(( $(date +%s) - start )) s"
  else
    echo "FAIL  $rel" >&2
    status=1
  fi
done
exit "$status"
