"""Fused kernels behind one public function, ``sde_step``, which calls the ops ``torch.ops.diffpure_fast.*``
directly: the dispatcher picks the kernel (see ``_library`` for what is registered where, ``_dispatch`` for
``force_impl`` and the ``DIFFPURE_FAST_IMPL`` override)."""

from __future__ import annotations

import torch

from ..noise import STREAM_REVERSE, check_seed
from ._dispatch import IMPL_ENV, IMPLS, available, default_impl_name, force_impl, forced_impl

__all__ = ["IMPLS", "IMPL_ENV", "available", "default_impl_name", "force_impl", "forced_impl", "sde_step"]


def sde_step(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, c: float, *, z: torch.Tensor | None = None,
             seed: int | None = None, sample_ids: torch.Tensor | None = None, step: int = 0,
             stream: int = STREAM_REVERSE, guide: torch.Tensor | None = None) -> torch.Tensor:
    """``a*x + b*eps + c*z [+ guide]`` in one pass over memory.

    x, eps (and z, guide when given): (B, ...) tensors of one shape, float dtype and device. Without ``z`` the
    noise is generated in-kernel from (seed, sample_ids[i], step, stream, element), see ``diffpure_fast.noise``;
    sample_ids: (B,) integers in [0, 2^32) on x's device: else a ValueError for CPU tensors, NaN in that sample's
    output for GPU ones (their range is not checked there: the check would synchronise every step). The result is
    contiguous.
    guide: an additive guidance term, summed last (``((a*x + b*eps) + c*z) + guide``); its gradient is the
    incoming one.
    """
    if z is not None:
        return torch.ops.diffpure_fast.sde_step_z.default(x, eps, z, float(a), float(b), float(c), guide)
    if seed is None or sample_ids is None:
        raise ValueError("sde_step: give either z, or both seed and sample_ids")
    check_seed(seed)
    return torch.ops.diffpure_fast.sde_step_philox.default(x, eps, float(a), float(b), float(c), seed,
                                                           sample_ids.to(torch.int64), step, stream, guide)
