"""The fused SDE-step ops, declared once with torch.library.

``diffpure_fast::sde_step_z``       x_next = a*x + b*eps + c*z            (z given: exact tests, given increments)
``diffpure_fast::sde_step_philox``  x_next = a*x + b*eps + c*z(counter)   (z generated in-kernel, never stored)

Both take an optional last argument ``guide`` (guided purification): x_next = ((a*x + b*eps) + c*z) + guide, in
the same launch; None is the unguided step, bit for bit.

Each op has one Python entry whose body asks ``select_impl`` which implementation runs (reference, the C++ CPU
kernel, the CUDA kernel or the Triton kernel); fake (meta) and autograd formulas are registered here once.

Layout contract, for every implementation and the fake kernels alike: the output is a new contiguous tensor
(row-major in x's shape) whatever the strides of the inputs (channels_last, transposed, sliced). The kernels
read contiguous copies and write a contiguous output; the reference makes its result contiguous. torch.compile
trusts the fake kernel's strides, so an implementation that returned x's layout instead would break it.

sde_step_philox checks ``sample_ids`` once here, for every implementation: int64 values in [0, 2^32) (the
counter word they fill is 32 bits; the kernels would wrap larger ones, the reference return non-finite noise).
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import select_impl

__all__ = ["sde_step_philox", "sde_step_z"]


def _check_like(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every given tensor has x's shape, dtype and device (None, an absent guide, passes).

    Run by the ops and their fake kernels, so that every implementation (the reference included, which would
    broadcast or promote) and a mixed-device call (dispatched to the fake kernel) raise an error naming the tensor.
    """
    for name, t in others.items():
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"sde_step: {name} must have the shape, dtype and device of x {tuple(x.shape)}, "
                             f"{x.dtype}, {x.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}")


_MAX_SAMPLE_ID = 0xFFFFFFFF


def _check_sample_ids(x: torch.Tensor, sample_ids: torch.Tensor, *, values: bool) -> None:
    """sample_ids (B,) int64 on x's device; with ``values`` (not in the fake kernel: a fake tensor has none) every
    id in [0, 2^32).

    The value check is one reduction and one device-to-host copy: on a GPU a synchronisation per step, which costs
    the tens of microseconds the host then needs to queue the next kernels, against milliseconds per evaluation of
    a score network. It is skipped while a CUDA graph is captured, where a synchronisation is not allowed."""
    if x.dim() < 1:
        raise ValueError("sde_step: x must be (B, ...), got a 0-dim tensor")
    if sample_ids.shape != (x.shape[0],) or sample_ids.dtype != torch.int64 or sample_ids.device != x.device:
        raise ValueError(f"sde_step: sample_ids must be ({x.shape[0]},) int64 on x's device {x.device}; got "
                         f"{tuple(sample_ids.shape)} {sample_ids.dtype} on {sample_ids.device}")
    if not values or sample_ids.numel() == 0:
        return
    if sample_ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.stack(torch.aminmax(sample_ids)).tolist()
    if lo < 0 or hi > _MAX_SAMPLE_ID:
        raise ValueError(f"sde_step: sample_ids must be in [0, 2^32) (they fill a 32-bit word of the noise counter); "
                         f"got values in [{lo}, {hi}]")


@torch.library.custom_op("diffpure_fast::sde_step_z", mutates_args=())
def sde_step_z(x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, a: float, b: float, c: float,
               guide: torch.Tensor | None = None) -> torch.Tensor:
    _check_like(x, eps=eps, z=z, guide=guide)
    return select_impl(x).sde_step_z(x, eps, z, a, b, c, guide)


@sde_step_z.register_fake
def _(x, eps, z, a, b, c, guide=None):
    _check_like(x, eps=eps, z=z, guide=guide)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_step_z_setup(ctx, inputs, output):
    ctx.abc = inputs[3:6]
    ctx.guided = inputs[6] is not None


def _sde_step_z_backward(ctx, grad):
    # The guide enters with coefficient 1: its gradient is the incoming one.
    a, b, c = ctx.abc
    return grad * a, grad * b, grad * c, None, None, None, grad if ctx.guided else None


sde_step_z.register_autograd(_sde_step_z_backward, setup_context=_sde_step_z_setup)


@torch.library.custom_op("diffpure_fast::sde_step_philox", mutates_args=())
def sde_step_philox(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, c: float,
                    seed: int, sample_ids: torch.Tensor, step: int, stream: int,
                    guide: torch.Tensor | None = None) -> torch.Tensor:
    _check_like(x, eps=eps, guide=guide)
    _check_sample_ids(x, sample_ids, values=True)
    return select_impl(x).sde_step_philox(x, eps, a, b, c, seed, sample_ids, step, stream, guide)


@sde_step_philox.register_fake
def _(x, eps, a, b, c, seed, sample_ids, step, stream, guide=None):
    _check_like(x, eps=eps, guide=guide)
    _check_sample_ids(x, sample_ids, values=False)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_step_philox_setup(ctx, inputs, output):
    ctx.ab = inputs[2:4]
    ctx.guided = inputs[9] is not None


def _sde_step_philox_backward(ctx, grad):
    # The noise does not depend on x or eps, so it has no derivative to carry; the guide's is the incoming one.
    a, b = ctx.ab
    return grad * a, grad * b, None, None, None, None, None, None, None, grad if ctx.guided else None


sde_step_philox.register_autograd(_sde_step_philox_backward, setup_context=_sde_step_philox_setup)

# Keep the reference reachable as an attribute so that tests can compare against it directly.
reference_impl = reference
