"""The fused SDE-step ops: what Python registers for them (the extension-cpp pattern).

``diffpure_fast::sde_step_z``       x_next = a*x + b*eps + c*z            (z given: exact tests, given increments)
``diffpure_fast::sde_step_philox``  x_next = a*x + b*eps + c*z(counter)   (z generated in-kernel, never stored)

Both take an optional last argument ``guide`` (guided purification): x_next = ((a*x + b*eps) + c*z) + guide, in
the same launch; None is the unguided step, bit for bit.

Who registers what, for every call to go through the dispatcher with no Python wrapper in front of it:

==========================  ==============================================================================
schemas                     C++ (``TORCH_LIBRARY`` in csrc/diffpure_fast.cpp); here, from ``SCHEMAS``, only
                            when the extension is missing (a test checks that the two agree)
CPU kernel                  C++ (csrc/diffpure_fast.cpp)
CUDA kernel                 C++ (csrc/cuda/sde_step.cu) when built with CUDA; else here, the Triton kernel
                            (``triton_sde``, imported on the first CUDA call), or the reference without triton
any other device            here, the pure-torch reference (``CompositeExplicitAutograd``): the CPU kernel too
                            when the extension is missing
fake (meta) kernel          here (``register_fake``): the checks below and the output's shape and strides
autograd formula            here (``register_autograd``)
==========================  ==============================================================================

``_dispatch.force_impl`` (and ``DIFFPURE_FAST_IMPL``) shadows the CPU/CUDA kernels with another implementation.

Layout contract, for every implementation and the fake kernels alike: the output is a new contiguous tensor
(row-major in x's shape) whatever the strides of the inputs (channels_last, transposed, sliced). The kernels
read contiguous copies and write a contiguous output; the reference makes its result contiguous. torch.compile
trusts the fake kernel's strides, so an implementation that returned x's layout instead would break it.

Input checks, one rule for every implementation: the C++ kernels check in C++ (csrc/sde_step.h), the Python
kernels and the fake kernels with the functions below; both raise ValueError with the same messages, naming the
argument. ``sample_ids`` are int64 in [0, 2^32) (the counter word they fill is 32 bits: a larger or negative id
would wrap onto another id's noise). Their values are checked on CPU tensors only: on a GPU the check is a
reduction and a device-to-host copy, a synchronisation per step (15-40 us in which the host queues nothing, an
error under ``torch.cuda.set_sync_debug_mode("error")``, impossible during CUDA-graph capture). There the engine
checks the ids once per purification, and every implementation (CUDA, Triton, reference) writes NaN for a sample
whose id is out of range, so a direct call with a bad id fails visibly, never with another sample's noise. The
fake kernels check no values (a fake tensor has none).
"""

from __future__ import annotations

import functools

import torch

from . import _ext, reference

__all__ = ["NAMESPACE", "SCHEMAS", "python_kernels"]

NAMESPACE = "diffpure_fast"
# The schemas as csrc/diffpure_fast.cpp's TORCH_LIBRARY block declares them; defined from here only when the
# extension is missing.
SCHEMAS = {
    "sde_step_z": "sde_step_z(Tensor x, Tensor eps, Tensor z, float a, float b, float c, Tensor? guide=None) -> Tensor",
    "sde_step_philox": "sde_step_philox(Tensor x, Tensor eps, float a, float b, float c, int seed, Tensor sample_ids, "
                       "int step, int stream, Tensor? guide=None) -> Tensor",
}

_MAX_SAMPLE_ID = 0xFFFFFFFF
_MAX_ELEMENTS_PER_SAMPLE = 1 << 34  # noise.MAX_ELEMENTS_PER_SAMPLE: Philox's first counter word holds e >> 2


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)}, {t.dtype}, {t.device}"


def _check_like(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """x a floating (B, ...) tensor, and every given tensor of x's shape, dtype and device (None, an absent guide,
    passes): the reference would broadcast or promote, and a mixed-device call dispatches to the fake kernel."""
    if not x.is_floating_point():
        raise ValueError(f"sde_step: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("sde_step: x must be (B, ...), got a 0-dim tensor")
    for name, t in others.items():
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"sde_step: {name} must have the shape, dtype and device of x {_describe(x)}; got "
                             f"{_describe(t)}")


def _check_philox(x: torch.Tensor, seed: int, sample_ids: torch.Tensor, *, values: bool) -> None:
    """seed in [0, 2^63); sample_ids (B,) int64 on x's device; at most 2^34 elements per sample; with ``values``
    (not in the fake kernel: a fake tensor has none) every id in [0, 2^32), on CPU tensors only (see the module
    docstring: on a GPU the kernels write NaN for an out-of-range id instead of a synchronising check)."""
    if seed < 0:
        raise ValueError(f"sde_step: seed must be in [0, 2^63), got {seed}")
    if sample_ids.shape != (x.shape[0],) or sample_ids.dtype != torch.int64 or sample_ids.device != x.device:
        raise ValueError(f"sde_step: sample_ids must be ({x.shape[0]},) int64 on x's device {x.device}; got "
                         f"{tuple(sample_ids.shape)} {sample_ids.dtype} on {sample_ids.device}")
    per_sample = x.numel() // x.shape[0] if x.shape[0] else 0
    if per_sample > _MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"sde_step: at most 2^34 elements per sample, got {per_sample}")
    if not values or sample_ids.numel() == 0 or sample_ids.device.type != "cpu":
        return
    lo, hi = torch.stack(torch.aminmax(sample_ids)).tolist()
    if lo < 0 or hi > _MAX_SAMPLE_ID:
        raise ValueError(f"sde_step: sample_ids must be in [0, 2^32) (they fill a 32-bit word of the noise counter); "
                         f"got values in [{lo}, {hi}]")


def python_kernels(resolve):
    """{op name: kernel} running ``resolve()``'s functions (a module with ``sde_step_z`` and ``sde_step_philox``:
    the reference, or Triton) after the checks the C++ kernels make; ``resolve`` is called on each call, so that it
    can import its module on the first one (triton is never imported with the package)."""

    def sde_step_z(x, eps, z, a, b, c, guide=None):
        _check_like(x, eps=eps, z=z, guide=guide)
        return resolve().sde_step_z(x, eps, z, a, b, c, guide)

    def sde_step_philox(x, eps, a, b, c, seed, sample_ids, step, stream, guide=None):
        _check_like(x, eps=eps, guide=guide)
        _check_philox(x, seed, sample_ids, values=True)
        return resolve().sde_step_philox(x, eps, a, b, c, seed, sample_ids, step, stream, guide)

    return {"sde_step_z": sde_step_z, "sde_step_philox": sde_step_philox}


@functools.cache
def _cuda_fallback():
    """The Triton kernels when triton can be imported, else the reference: the CUDA kernel without a C++ one."""
    from . import triton_sde

    return triton_sde.impl() or reference


def _sde_step_z_fake(x, eps, z, a, b, c, guide=None):
    _check_like(x, eps=eps, z=z, guide=guide)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_step_philox_fake(x, eps, a, b, c, seed, sample_ids, step, stream, guide=None):
    _check_like(x, eps=eps, guide=guide)
    _check_philox(x, seed, sample_ids, values=False)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_step_z_setup(ctx, inputs, output):
    ctx.abc = inputs[3:6]
    ctx.guided = inputs[6] is not None


def _sde_step_z_backward(ctx, grad):
    # The guide enters with coefficient 1: its gradient is the incoming one.
    a, b, c = ctx.abc
    return grad * a, grad * b, grad * c, None, None, None, grad if ctx.guided else None


def _sde_step_philox_setup(ctx, inputs, output):
    ctx.ab = inputs[2:4]
    ctx.guided = inputs[9] is not None


def _sde_step_philox_backward(ctx, grad):
    # The noise does not depend on x or eps, so it has no derivative to carry; the guide's is the incoming one.
    a, b = ctx.ab
    return grad * a, grad * b, None, None, None, None, None, None, None, grad if ctx.guided else None


def _register() -> torch.library.Library:
    # Load the extension first: its TORCH_LIBRARY block declares the schemas, and which C++ kernels it registered
    # decides which Python kernels are needed.
    extension_missing = _ext.load_error() is not None
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    if extension_missing:
        for schema in SCHEMAS.values():
            lib.define(schema)
    for name, kernel in python_kernels(lambda: reference).items():
        lib.impl(name, kernel, "CompositeExplicitAutograd")
    if not _ext.has_kernel("CUDA"):
        for name, kernel in python_kernels(_cuda_fallback).items():
            lib.impl(name, kernel, "CUDA")
    for name, fake in (("sde_step_z", _sde_step_z_fake), ("sde_step_philox", _sde_step_philox_fake)):
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)
    torch.library.register_autograd(f"{NAMESPACE}::sde_step_z", _sde_step_z_backward,
                                    setup_context=_sde_step_z_setup, lib=lib)
    torch.library.register_autograd(f"{NAMESPACE}::sde_step_philox", _sde_step_philox_backward,
                                    setup_context=_sde_step_philox_setup, lib=lib)
    return lib


# Held for the life of the process: the registrations are undone when the Library object is collected.
_LIB = _register()
