"""The fused SDE-step ops, declared once with torch.library.

``diffpure_fast::sde_step_z``       x_next = a*x + b*eps + c*z            (z given: exact tests, given increments)
``diffpure_fast::sde_step_philox``  x_next = a*x + b*eps + c*z(counter)   (z generated in-kernel, never stored)

Each op has one Python entry whose body asks ``select_impl`` which implementation runs (reference, the C++ CPU
kernel, the CUDA kernel or the Triton kernel); fake (meta) and autograd formulas are registered here once.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import select_impl

__all__ = ["sde_step_philox", "sde_step_z"]


@torch.library.custom_op("diffpure_fast::sde_step_z", mutates_args=())
def sde_step_z(x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    return select_impl(x).sde_step_z(x, eps, z, a, b, c)


@sde_step_z.register_fake
def _(x, eps, z, a, b, c):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_step_z_setup(ctx, inputs, output):
    ctx.abc = inputs[3:6]


def _sde_step_z_backward(ctx, grad):
    a, b, c = ctx.abc
    return grad * a, grad * b, grad * c, None, None, None


sde_step_z.register_autograd(_sde_step_z_backward, setup_context=_sde_step_z_setup)


@torch.library.custom_op("diffpure_fast::sde_step_philox", mutates_args=())
def sde_step_philox(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, c: float,
                    seed: int, sample_ids: torch.Tensor, step: int, stream: int) -> torch.Tensor:
    return select_impl(x).sde_step_philox(x, eps, a, b, c, seed, sample_ids, step, stream)


@sde_step_philox.register_fake
def _(x, eps, a, b, c, seed, sample_ids, step, stream):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sde_step_philox_setup(ctx, inputs, output):
    ctx.ab = inputs[2:4]


def _sde_step_philox_backward(ctx, grad):
    # The noise does not depend on x or eps, so it has no derivative to carry.
    a, b = ctx.ab
    return grad * a, grad * b, None, None, None, None, None, None, None


sde_step_philox.register_autograd(_sde_step_philox_backward, setup_context=_sde_step_philox_setup)

# Keep the reference reachable as an attribute so that tests can compare against it directly.
reference_impl = reference
