# Two commands set up a fresh machine and do the work:
#   make demo   virtual environment + extension build, then the attack-and-purify demo on the embedded digits model
#   make test   the same set-up, then lint, the C++ tests, the CUDA compile check (when nvcc is present), pytest
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out/demo
SOURCES := setup.py pyproject.toml requirements-dev.txt diffpure_fast/_build.py \
           $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
# A GPU that nvidia-smi can list makes the build include the CUDA kernels (FORCE_CUDA=1: setup.py then fails with
# the reason, e.g. a CPU-only torch, instead of quietly building CPU-only); DIFFPURE_FAST_NO_CUDA=1 opts out.
# Without one, setup.py builds the CPU kernels only. On a GPU machine, tests/conftest.py fails any CUDA test that
# skips because the CUDA kernels are missing.
GPUS   := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
CUDA_BUILD := $(if $(filter-out 0,$(GPUS)),FORCE_CUDA=1,)

.PHONY: install build demo test lint cpp-test cuda-check pytest bench bench-suite bench-scaling bench-gpu plots clean \
        gpu-wheels gpu-check

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(CUDA_BUILD) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(VENV)/bin/diffpure-fast demo --output $(OUT) --overwrite

test: lint cpp-test cuda-check pytest

lint: $(STAMP)
	$(PY) -m ruff check diffpure_fast tests benchmarks scripts

cpp-test: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH scripts/run_cpp_tests.sh

cuda-check: $(STAMP)
	@if command -v nvcc >/dev/null 2>&1; then PATH=$(abspath $(VENV))/bin:$$PATH scripts/check_cuda_compile.sh; \
	else echo "cuda-check: nvcc not found, CUDA compile check skipped"; fi

pytest: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_sde_step.py
	$(PY) benchmarks/bench_purify.py
	$(PY) benchmarks/bench_grad.py
	$(PY) benchmarks/bench_networks.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/plot_results.py

# The micro-benchmarks under pytest-benchmark (plain `pytest` never collects benchmarks/: testpaths is tests).
BENCH_DEV := $(if $(filter-out 0,$(GPUS)),cuda,cpu)
bench-suite: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/micro_$(BENCH_DEV).json

bench-scaling: $(STAMP)
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/plot_results.py

# Needs a CUDA GPU (exits with a message without one).
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py
	$(PY) benchmarks/plot_results.py

# The GPU machine has its own python3 (torch 2.11 + CUDA 13.0, Triton 3.6), no internet and no torchsde: fetch
# torchsde's wheels here (pure Python; its METADATA needs numpy, scipy, torch, there already, and trampoline), carry
# .whl with the call, and run scripts/gpu_check.sh there (README, "GPU path"). QUICK=1: the under-3-minute form.
GPU_WHEELS := $(shell grep -m1 '^torchsde==' requirements-dev.txt) trampoline==0.1.2
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)

gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh $(if $(QUICK),--quick,)

plots: $(STAMP)
	$(PY) benchmarks/plot_results.py

clean:
	rm -rf build $(VENV) *.egg-info diffpure_fast/_C*.so out
