"""Build-time decisions of setup.py: whether to compile the CUDA kernels and for which GPU architectures; and the
C++ standard torch's extension builder compiles with (for scripts/check_cuda_compile.sh).

Kept free of torch and setuptools (the facts about the machine are arguments) so that tests can check every case
without building; setup.py loads this file by path, since the package cannot be imported while it is being built.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping

__all__ = ["DEFAULT_ARCH_LIST", "cuda_arch_list", "cxx_standard", "flag", "use_cuda"]

# The targets of a CUDA build with no GPU to read them from: sm_80 (A100) and sm_90 (H100) machine code, plus
# compute_90 PTX that the driver JIT-compiles on newer GPUs (sm_100, sm_120), which would otherwise get "no kernel
# image" -- with no fallback, since the CUDA kernel counts as registered. An older GPU (sm_75 T4) needs a build on
# that machine (torch then reads its capability) or TORCH_CUDA_ARCH_LIST.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def flag(env: Mapping[str, str], name: str) -> bool:
    """An on/off environment variable: 1, true, yes or on (any case) is on; unset is off."""
    return env.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def use_cuda(env: Mapping[str, str], *, gpu_visible: bool, torch_cuda: str | None, cuda_home: str | None) -> bool:
    """Whether to compile the CUDA kernels: a GPU is visible or FORCE_CUDA=1, and not DIFFPURE_FAST_NO_CUDA=1.

    torch_cuda: torch.version.cuda (None for a CPU-only torch); cuda_home: the CUDA toolkit found by torch. A
    requested CUDA build that cannot succeed raises here, with the reason, rather than failing at link time."""
    if flag(env, "DIFFPURE_FAST_NO_CUDA") or not (gpu_visible or flag(env, "FORCE_CUDA")):
        return False
    if torch_cuda is None:
        raise RuntimeError("setup.py: a CUDA build was requested (FORCE_CUDA=1) but the installed torch is a CPU-only "
                           "build: install a CUDA torch, or set DIFFPURE_FAST_NO_CUDA=1 for a CPU-only build")
    if cuda_home is None:
        raise RuntimeError("setup.py: a CUDA build was requested but no CUDA toolkit was found (set CUDA_HOME, or "
                           "DIFFPURE_FAST_NO_CUDA=1 for a CPU-only build)")
    return True


def cuda_arch_list(user_value: str | None, *, gpu_visible: bool) -> str | None:
    """The TORCH_CUDA_ARCH_LIST a CUDA build runs with; None leaves it unset.

    The user's value wins. Otherwise, with a GPU visible, torch.utils.cpp_extension builds for the compute
    capability of every visible GPU plus PTX of the newest, so it must stay unset (any hard-coded -gencode would
    stop that detection); without a GPU there is nothing to detect and DEFAULT_ARCH_LIST is built."""
    if user_value is not None and user_value.strip():
        return user_value
    return None if gpu_visible else DEFAULT_ARCH_LIST


def cxx_standard(cpp_extension_source: str) -> str:
    """The C++ standard ("c++17", "c++20") that torch.utils.cpp_extension passes to every compiler of an extension,
    read from that module's source (torch has no API for it): torch 2.11 builds extensions as C++17, torch 2.13
    as C++20, and a compile check must use the flag of the torch it checks against.

    The flag BuildExtension appends when none is given (``cpp_flag_prefix + 'c++NN'``); else the most frequent
    quoted ``'-std=c++NN'``. ValueError when the source names none."""
    found = re.search(r"cpp_flag_prefix\s*\+\s*['\"](c\+\+\d+)['\"]", cpp_extension_source)
    if found:
        return found.group(1)
    counts = Counter(re.findall(r"['\"]-std=(c\+\+\d+)['\"]", cpp_extension_source))
    if not counts:
        raise ValueError("cpp_extension_source: names no -std=c++NN flag (not torch.utils.cpp_extension's source?)")
    return counts.most_common(1)[0][0]
