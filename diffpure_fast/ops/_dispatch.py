"""Which implementation runs a fused-step op, and how to force one.

By default the dispatcher picks the kernels ``_library`` describes: CPU tensors the C++ kernel when the extension is
built, CUDA tensors the CUDA kernel, else Triton, else the pure-torch reference. ``force_impl(name)`` (name =
``reference`` | ``cpp`` | ``cuda`` | ``triton``) makes every later call run that implementation instead, on every
device: it registers Python kernels for the CPU and CUDA dispatch keys that shadow the default ones (the C++ kernels
stay registered underneath, and come back with ``force_impl(None)``); on a device where that implementation cannot
run, the call raises an error naming it. ``DIFFPURE_FAST_IMPL=<name>`` in the environment is applied this way once,
when ``diffpure_fast.ops`` is imported (a later change of the variable is not seen: call ``force_impl``). Without an
override (the default) a call runs the autograd kernel registered from Python, then the C++ kernel: no Python check
and no Python wrapper in front of the dispatcher.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings

import torch

from . import _ext, _library, reference

__all__ = ["IMPLS", "IMPL_ENV", "available", "default_impl_name", "force_impl", "forced_impl"]

IMPL_ENV = "DIFFPURE_FAST_IMPL"
IMPLS = ("reference", "cpp", "cuda", "triton")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _module(name: str):
    """The implementation ``name`` as an object with ``sde_step_z`` / ``sde_step_philox`` that runs it directly (no
    input checks beyond its own), or None when it is not available here. For tests and benchmarks."""
    if name == "reference":
        return reference
    if name == "cpp":
        return _ext.cpu_impl()
    if name == "cuda":
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


def _normalise(name: str | None) -> str | None:
    name = (name or "").strip().lower()
    if not name:
        return None
    if name not in IMPLS:
        raise ValueError(f"{IMPL_ENV}: expected one of {IMPLS}, got {name!r}")
    return name


_forced: str | None = None
_env_error: str | None = None  # an unknown DIFFPURE_FAST_IMPL at import: every call raises this ValueError instead
_override: torch.library.Library | None = None


def forced_impl() -> str | None:
    """The implementation forced by ``force_impl`` or ``DIFFPURE_FAST_IMPL``, or None (the default choice)."""
    if _env_error is not None:
        raise ValueError(_env_error)
    return _forced


def default_impl_name(device: torch.device) -> str:
    """The implementation that runs the step ops on ``device``'s tensors."""
    forced = forced_impl()
    if forced is not None:
        return forced
    if device.type == "cuda":
        return "cuda" if _ext.has_kernel("CUDA") else "triton" if available("triton") else "reference"
    if device.type == "cpu" and _ext.has_kernel("CPU"):
        return "cpp"
    return "reference"


def _raising(message: str, error: type[Exception] = RuntimeError):
    """Kernels for both ops that raise ``error(message)``: a forced implementation that cannot run here."""

    def kernel(*args, **kwargs):
        raise error(message)

    return {op: kernel for op in _library.SCHEMAS}


@functools.cache
def _triton_or_none():
    return _module("triton")


def _triton():
    impl = _triton_or_none()
    if impl is None:
        raise RuntimeError(f"{IMPL_ENV}=triton: that implementation is not available on this machine (no triton)")
    return impl


def _override_kernels(name: str, device_type: str) -> dict | None:
    """The kernels that make ``device_type``'s tensors run ``name``: None when the default registration already does
    (a C++ kernel), kernels that raise when ``name`` cannot run there. triton is imported on the first call."""
    if name == "reference":
        return _library.python_kernels(lambda: reference)
    if name == "triton":
        return _library.python_kernels(_triton)
    own = {"cpp": "cpu", "cuda": "cuda"}[name]
    if device_type != own:
        return _raising(f"{IMPL_ENV}={name}: that implementation runs on {own} tensors only, got {device_type} ones")
    if _ext.has_kernel(_DISPATCH_KEYS[device_type]):
        return None
    why = _ext.load_error() or "the extension was built without CUDA"
    return _raising(f"{IMPL_ENV}={name}: that implementation is not available on this machine ({why})")


def _install(kernels_by_key: dict[str, dict | None]) -> None:
    global _override
    if _override is not None:
        _override._destroy()  # the dispatcher falls back to the kernels registered before it
        _override = None
    if not any(kernels_by_key.values()):
        return
    lib = torch.library.Library(_library.NAMESPACE, "FRAGMENT")
    # Overriding is the point (_destroy restores what was there). torch 2.11 refuses, by default, a second Python
    # kernel for a key that _library already registered one for (its CUDA fallback); torch 2.13 allows it. A failed
    # install is undone, so that no half-registered override outlives it.
    override = {"allow_override": True} if "allow_override" in inspect.signature(lib.impl).parameters else {}
    try:
        with warnings.catch_warnings():
            # "Overriding a previously registered kernel": that is the point.
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            for key, kernels in kernels_by_key.items():
                for op, kernel in (kernels or {}).items():
                    lib.impl(op, kernel, key, **override)
    except BaseException:
        lib._destroy()
        raise
    _override = lib


def force_impl(name: str | None) -> str | None:
    """Run every later step op on implementation ``name`` (one of ``IMPLS``, any case), or on the default choice
    with None; returns the implementation forced before (None: the default). See the module docstring."""
    global _forced, _env_error
    name = _normalise(name)
    previous = _forced
    _install({key: None if name is None else _override_kernels(name, device_type)
              for device_type, key in _DISPATCH_KEYS.items()})
    _forced, _env_error = name, None
    return previous


def _apply_env() -> None:
    global _env_error
    try:
        force_impl(os.environ.get(IMPL_ENV))
    except ValueError as exc:  # an unknown value must not break `import diffpure_fast`: every call raises it
        _install({key: _raising(str(exc), ValueError) for key in _DISPATCH_KEYS.values()})
        _env_error = str(exc)


_apply_env()
