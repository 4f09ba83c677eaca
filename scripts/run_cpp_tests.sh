#!/usr/bin/env bash
# Configure, build and run the C++ unit tests (CMakeLists.txt) in build/cpp with Ninja.
# cmake and ninja come from PATH: the system's, or the venv's (pip install cmake ninja).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build/cpp"
export PATH="$ROOT/.venv/bin:$PATH"

command -v cmake >/dev/null || { echo "run_cpp_tests: cmake not found (pip install cmake)" >&2; exit 2; }
command -v ninja >/dev/null || { echo "run_cpp_tests: ninja not found (pip install ninja)" >&2; exit 2; }

cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD"
ctest --test-dir "$BUILD" --output-on-failure
