"""L-infinity PGD (Madry et al. 2018) with expectation over transformation (EOT, Athalye et al. 2018).

The attacked model is ``forward(x, draw) -> logits``: ``draw`` numbers the random draw (for a purifier, the noise
seed), so the attack is reproducible and an EOT average uses ``eot`` distinct draws per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["pgd_linf"]


def pgd_linf(forward: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
             eps: float, steps: int, step_size: float | None = None, eot: int = 1, random_start: bool = True,
             seed: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy, with the EOT mean of ``eot`` gradients per step.

    Args:
        forward: ``forward(x_adv, draw)`` -> logits (B, K); must be differentiable in x_adv.
        x: (B, C, H, W) clean images in [0, 1]; y: (B,) int64 labels.
        eps: the L-inf radius (in [0, 1] units); step_size: defaults to 2.5 eps / steps (Madry et al.).
        eot: gradient draws averaged per step; the draw index of step s, sample e is ``s * eot + e``.
        seed: seeds the random start (a private generator: torch's global RNG is untouched).
        progress: called with the number of gradient evaluations just done (e.g. a tqdm ``update``).
    Returns:
        (B, C, H, W) adversarial images in [0, 1] with ``|x_adv - x|_inf <= eps``.
    """
    if eps < 0 or steps < 0 or eot < 1:
        raise ValueError(f"eps, steps, eot: expected eps >= 0, steps >= 0, eot >= 1, got {eps}, {steps}, {eot}")
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    x = x.detach()
    x_adv = x.clone()
    if random_start and eps > 0:
        g = torch.Generator(device="cpu").manual_seed(seed)
        x_adv = x_adv + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1).to(x.device) * eps
        x_adv = x_adv.clamp(0.0, 1.0)
    for s in range(steps):
        grad = torch.zeros_like(x)
        for e in range(eot):
            xg = x_adv.clone().requires_grad_(True)
            loss = F.cross_entropy(forward(xg, s * eot + e), y, reduction="sum")
            grad += torch.autograd.grad(loss, xg)[0]
            if progress is not None:
                progress(1)
        x_adv = x_adv + alpha * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return x_adv
