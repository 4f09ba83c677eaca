"""Build diffpure_fast and its kernel extension diffpure_fast._C.

The C++ CPU kernels are always built. The CUDA kernels are added when a GPU is visible or FORCE_CUDA=1 (e.g. a
wheel built on a CPU-only machine with nvcc), and never when DIFFPURE_FAST_NO_CUDA=1. Their GPU architectures:
TORCH_CUDA_ARCH_LIST when set, else those of the visible GPUs (torch detects them), else sm_80, sm_90 and
compute_90 PTX (diffpure_fast/_build.py). The package works without the extension: every op falls back to the
pure-torch reference, and nothing is ever compiled at import time.

    pip install --no-build-isolation -e .                      # torch must already be installed
    DEBUG=1 MAX_JOBS=4 pip install --no-build-isolation -e .   # -O0 -g, at most 4 compiler processes
"""

import importlib.util
import os
import re
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _load_build_rules():
    """diffpure_fast/_build.py, loaded by path: the package itself cannot be imported while it is being built."""
    spec = importlib.util.spec_from_file_location("diffpure_fast_build", ROOT / "diffpure_fast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_rules()


def _version() -> str:
    text = (ROOT / "diffpure_fast" / "__init__.py").read_text()
    return re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE).group(1)


def _extension():
    debug = _build.flag(os.environ, "DEBUG")
    gpu_visible = torch.cuda.is_available()
    use_cuda = _build.use_cuda(os.environ, gpu_visible=gpu_visible, torch_cuda=torch.version.cuda,
                               cuda_home=CUDA_HOME)
    # -ffp-contract=off / --fmad=false: no fused multiply-adds, so a*x + b*eps + c*z rounds like the torch
    # reference (see csrc/sde_step.h).
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", "-ffp-contract=off"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
    nvcc += ["--fmad=false"]
    arch_list = _build.cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), gpu_visible=gpu_visible)
    if use_cuda and arch_list is not None:
        # BuildExtension turns TORCH_CUDA_ARCH_LIST into -gencode flags (no GPU: sm_80, sm_90 and compute_90 PTX).
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
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
        # the library classifiers (models/classifiers/libraries.py): robustbench:NAME, torchvision:NAME, timm:NAME
        "robustbench": ["robustbench"],
        "torchvision": ["torchvision"],
        # the digits data (scikit-learn), image folders (Pillow), the report's plots (matplotlib), AutoAttack
        "eval": ["scikit-learn", "pillow", "matplotlib", "pyautoattack"],
        "certify": ["scipy"],
        "timm": ["timm"],
        "dev": ["pytest", "ruff", "torchsde", "torchdiffeq", "ninja", "cmake"],
    },
    entry_points={"console_scripts": ["diffpure-fast=diffpure_fast.cli:main"]},
    ext_modules=[_extension()],
    # BuildExtension uses ninja when present and runs at most MAX_JOBS compiler processes (ninja's -j).
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
