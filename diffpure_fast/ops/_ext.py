"""The compiled kernels of ``diffpure_fast._C`` (csrc/), when the extension is built.

The extension registers ``torch.ops.diffpure_fast_C.sde_step_z`` / ``sde_step_philox`` with a CPU kernel, plus a
CUDA kernel when it was built with CUDA. Importing this module loads nothing; ``cpu_impl()`` / ``cuda_impl()``
try ``import diffpure_fast._C`` once and answer None when it is missing. Nothing is ever compiled here: build with
``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["cpu_impl", "cuda_impl", "load_error"]

log = logging.getLogger(__name__)


@functools.cache
def _load() -> str | None:
    """None once ``diffpure_fast._C`` is loaded, else why it could not be."""
    try:
        from .. import _C  # noqa: F401  (loading the .so runs its TORCH_LIBRARY registrations)
    except ImportError as exc:
        log.debug("diffpure_fast._C not available: %s", exc)
        return f"{type(exc).__name__}: {exc}"
    return None


def load_error() -> str | None:
    """Why the extension is not available, or None when it is."""
    return _load()


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"diffpure_fast_C::{op}", dispatch_key)


class _Ext:
    """The two step ops of ``torch.ops.diffpure_fast_C``; the dispatcher picks the CPU or CUDA kernel."""

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __repr__(self) -> str:
        return f"diffpure_fast._C ({self.device_type})"

    @staticmethod
    def sde_step_z(x, eps, z, a, b, c, guide=None):
        return torch.ops.diffpure_fast_C.sde_step_z(x, eps, z, a, b, c, guide)

    @staticmethod
    def sde_step_philox(x, eps, a, b, c, seed, sample_ids, step, stream, guide=None):
        return torch.ops.diffpure_fast_C.sde_step_philox(x, eps, a, b, c, seed, sample_ids, step, stream, guide)


@functools.cache
def cpu_impl() -> _Ext | None:
    """The C++ CPU kernels, or None when ``diffpure_fast._C`` is not built."""
    if _load() is not None or not _has_kernel("sde_step_philox", "CPU"):
        return None
    return _Ext("cpu")


@functools.cache
def cuda_impl() -> _Ext | None:
    """The CUDA kernels, or None when the extension was built without CUDA or no GPU is visible."""
    if _load() is not None or not torch.cuda.is_available() or not _has_kernel("sde_step_philox", "CUDA"):
        return None
    return _Ext("cuda")
