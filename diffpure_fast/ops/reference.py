"""Pure-torch twins of every kernel: the fallback on any device and the oracle the kernel tests compare against."""

from __future__ import annotations

import torch

from ..noise import gaussian

__all__ = ["sde_step_philox", "sde_step_z"]


def sde_step_z(x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, a: float, b: float, c: float,
               guide: torch.Tensor | None = None) -> torch.Tensor:
    """One solver step ``a*x + b*eps + c*z [+ guide]``; all tensors (B, ...) of one shape, dtype and device.

    Arithmetic contract shared with the kernels: a, b, c are rounded to the tensors' dtype, each product is
    rounded, then ``(a*x + b*eps) + c*z`` is summed left to right (no fused multiply-add). With a guide (the
    guidance term of guided purification) the result is ``((a*x + b*eps) + c*z) + guide``: the guide is added
    last, that sum rounded to the dtype too. Without one the result is exactly the unguided step.

    Layout contract shared with the kernels (see ``_library``): the result is contiguous, whatever the inputs'
    strides -- torch's elementwise ops would keep a channels_last or permuted x's layout."""
    out = x * a + eps * b + z * c
    if guide is not None:
        out = out + guide
    return out.contiguous()


def sde_step_philox(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, c: float,
                    seed: int, sample_ids: torch.Tensor, step: int, stream: int,
                    guide: torch.Tensor | None = None) -> torch.Tensor:
    """``sde_step_z`` with ``z`` the counter noise of ``diffpure_fast.noise`` for (seed, sample_ids, step, stream).

    sample_ids: (B,) int64 on x's device; guide: optional, added last as in ``sde_step_z``."""
    z = gaussian(seed, sample_ids, step, stream, x[0].numel() if x.shape[0] else 0, x.dtype).reshape(x.shape)
    return sde_step_z(x, eps, z, a, b, c, guide)
