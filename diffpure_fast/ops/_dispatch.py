"""Which implementation runs a fused-step op: one predicate, one environment override.

``DIFFPURE_FAST_IMPL`` = ``reference`` | ``cpp`` | ``cuda`` | ``triton`` forces one (an error if it cannot run on
the tensor's device); unset, CPU tensors use the C++ kernel when the extension is built, CUDA tensors the CUDA
kernel, else Triton, else the reference.
"""

from __future__ import annotations

import os

import torch

from . import reference

IMPL_ENV = "DIFFPURE_FAST_IMPL"
IMPLS = ("reference", "cpp", "cuda", "triton")


def _module(name: str):
    if name == "reference":
        return reference
    if name == "cpp":
        from . import _ext
        return _ext.cpu_impl()
    if name == "cuda":
        from . import _ext
        return _ext.cuda_impl()
    if name == "triton":
        from . import triton_sde
        return triton_sde.impl()
    raise ValueError(f"{IMPL_ENV}: expected one of {IMPLS}, got {name!r}")


def available(name: str) -> bool:
    try:
        return _module(name) is not None
    except Exception:  # an unbuilt extension or a missing triton is a fallback, not an error, in auto mode
        return False


def default_impl_name(device: torch.device) -> str:
    forced = os.environ.get(IMPL_ENV, "").strip().lower()
    if forced:
        if forced not in IMPLS:
            raise ValueError(f"{IMPL_ENV}: expected one of {IMPLS}, got {forced!r}")
        return forced
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",) if device.type == "cpu" else ()
    for name in order:
        if available(name):
            return name
    return "reference"


def select_impl(x: torch.Tensor):
    """The implementation module for tensors like ``x``; it exposes ``sde_step_z`` and ``sde_step_philox``."""
    name = default_impl_name(x.device)
    module = _module(name)
    if module is None:
        raise RuntimeError(f"{IMPL_ENV}={name}: that implementation is not available on this machine")
    return module
