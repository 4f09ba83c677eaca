"""Build diffpure_fast and its kernel extension diffpure_fast._C.

The C++ CPU kernels are always built. The CUDA kernels are added when a GPU is visible or FORCE_CUDA=1 (e.g. a
wheel built on a CPU-only machine with nvcc), and never when DIFFPURE_FAST_NO_CUDA=1. The package works without
the extension: every op falls back to the pure-torch reference, and nothing is ever compiled at import time.

    pip install --no-build-isolation -e .                      # torch must already be installed
    DEBUG=1 MAX_JOBS=4 pip install --no-build-isolation -e .   # -O0 -g, at most 4 compiler processes
"""

import os
import re
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    text = (ROOT / "diffpure_fast" / "__init__.py").read_text()
    return re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE).group(1)


def _extension():
    debug = _flag("DEBUG")
    use_cuda = (torch.cuda.is_available() or _flag("FORCE_CUDA")) and not _flag("DIFFPURE_FAST_NO_CUDA")
    if use_cuda and CUDA_HOME is None:
        raise RuntimeError("setup.py: a CUDA build was requested but no CUDA toolkit was found (set CUDA_HOME, or "
                           "DIFFPURE_FAST_NO_CUDA=1 for a CPU-only build)")
    # -ffp-contract=off / --fmad=false: no fused multiply-adds, so a*x + b*eps + c*z rounds like the torch
    # reference (see csrc/sde_step.h).
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", "-ffp-contract=off"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
    nvcc += ["--fmad=false"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # A CPU-only machine has no GPU to take the arch list from: build the two targets the project supports.
        nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    sources = [str(CSRC / "diffpure_fast.cpp")]
    if use_cuda:
        sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    cls = CUDAExtension if use_cuda else CppExtension
    return cls(
        "diffpure_fast._C",
        [os.path.relpath(s, ROOT) for s in sources],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if use_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="diffpure_fast",
    version=_version(),
    description="DiffPure adversarial purification with fused, counter-based-noise SDE kernels and exact gradients",
    packages=find_packages(include=["diffpure_fast", "diffpure_fast.*"]),
    package_data={"diffpure_fast": ["weights/*.safetensors"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton"],
        "torchvision": ["torchvision"],
        "dev": ["pytest", "ruff", "torchsde", "ninja", "cmake"],
    },
    entry_points={"console_scripts": ["diffpure-fast=diffpure_fast.cli:main"]},
    ext_modules=[_extension()],
    # BuildExtension uses ninja when present and runs at most MAX_JOBS compiler processes (ninja's -j).
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
