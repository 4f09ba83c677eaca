"""DiffPure's ldsde, ddpm and celebahq-ddpm runners re-created from the official code, step by step, for tests and
benchmarks: independent of the engine's chain (plain loops over the official formulas, float64 numpy constants as the
official samplers compute them), with every random draw given.

* :class:`LDSDE` / :func:`torchsde_ldsde`: ``runners/diffpure_ldsde.py``'s SDE through ``torchsde.sdeint_adjoint``
  (its drift and diffusion, the state flattened to (B, C*H*W)); ``dw``: replayed Brownian increments, or None
  (torchsde's own).
* :func:`guided_p_sample_loop`: guided-diffusion's ``p_sample(clip_denoised=True)`` for t = L-1 .. 0
  (``runners/diffpure_guided.py``) on a learned-variance network.
* :func:`sdedit_loop`: SDEdit's ``image_editing_denoising_step_flexible_mask`` (``runners/diffpure_ddpm.py``).

``noise(k, like)``: the standard normal draw of the k-th step (call order).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchsde  # a dev dependency: this module serves the tests and benchmarks only

from ..models.base import ScoreModel
from ..schedule import DIFFPURE_SCHEDULE, VPSchedule
from ..solvers.euler import reverse_time_grid
from .torchsde_reference import ReplayBrownian, torchsde_ts

__all__ = ["LDSDE", "guided_p_sample_loop", "official_levels", "sdedit_loop", "torchsde_ldsde"]


def official_levels(schedule: VPSchedule = DIFFPURE_SCHEDULE) -> dict[str, np.ndarray]:
    """The official samplers' float64 arrays: betas, alphas_cumprod, alphas_cumprod_prev, posterior_variance."""
    betas = schedule.discrete_betas().numpy()
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    return {"betas": betas, "abar": abar, "abar_prev": abar_prev,
            "post_var": betas * (1.0 - abar_prev) / (1.0 - abar)}


class LDSDE(torch.nn.Module):
    """The official LDSDE: drift ``-lambda/2 (-score(x, 0.01) + (x - x_in) / sigma2)``, diffusion
    ``sqrt(lambda) eta``, Ito, diagonal."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, model: ScoreModel, x_in: torch.Tensor, *, sigma2: float, lambda_ld: float, eta: float):
        super().__init__()
        self.model, self.x_in, self.img_shape = model, x_in.flatten(1), tuple(x_in.shape[1:])
        self.sigma2, self.lambda_ld, self.eta = sigma2, lambda_ld, eta

    def f(self, s, y):
        t = torch.zeros(y.shape[0], dtype=torch.float32, device=y.device) + 1e-2
        score = self.model.score(y.view(-1, *self.img_shape), t.to(y.dtype)).flatten(1)
        return -0.5 * (-score + (y - self.x_in) / self.sigma2) * self.lambda_ld

    def g(self, s, y):
        return torch.full_like(y, math.sqrt(self.lambda_ld) * self.eta)


def torchsde_ldsde(x_in: torch.Tensor, model: ScoreModel, t_star: float, *, sigma2: float = 1e-3,
                   lambda_ld: float = 1e-2, eta: float = 5.0, dt: float = 1e-2, dw=None, bm=None,
                   adjoint: bool = True) -> torch.Tensor:
    """The official Langevin purification of x_in (B, C, H, W) in [-1, 1] by ``torchsde.sdeint_adjoint(method=
    "euler", adaptive=False, dt=dt)`` (``adjoint=False``: ``sdeint``, whose autograd keeps the path through x_in,
    which the adjoint's gradient drops: x_in is not one of its adjoint parameters); dw: (steps, B, C, H, W)
    increments on torchsde's grid, replayed (a forward solve only), or bm: a torchsde Brownian motion."""
    sde = LDSDE(model, x_in, sigma2=sigma2, lambda_ld=lambda_ld, eta=eta)
    ts = torchsde_ts(t_star, x_in.device, x_in.dtype)
    if dw is not None:
        np_dtype = np.float64 if x_in.dtype == torch.float64 else np.float32
        bm = ReplayBrownian(torch.as_tensor(reverse_time_grid(t_star, dt, np_dtype)).to(x_in), dw)
    solve = torchsde.sdeint_adjoint if adjoint else torchsde.sdeint
    ys = solve(sde, x_in.flatten(1), ts, method="euler", adaptive=False, dt=dt, bm=bm)
    return ys[-1].view_as(x_in)


def guided_p_sample_loop(x_t: torch.Tensor, model: ScoreModel, level: int, noise) -> torch.Tensor:
    """guided-diffusion's p_sample(clip_denoised=True) for t = level-1 .. 0 from x_t (B, C, H, W): the network's
    learned log variance between the clipped posterior variance and beta, x0 from eps clipped to [-1, 1], the
    posterior mean of it, noise except at t = 0. ``model.net(x, t)`` returns 2C channels."""
    a = official_levels(model.schedule)
    coef1 = a["betas"] * np.sqrt(a["abar_prev"]) / (1.0 - a["abar"])
    coef2 = (1.0 - a["abar_prev"]) * np.sqrt(1.0 - a["betas"]) / (1.0 - a["abar"])
    min_log = np.log(np.append(a["post_var"][1], a["post_var"][1:]))
    max_log = np.log(a["betas"])
    c = x_t.shape[1]
    x = x_t
    for k, i in enumerate(reversed(range(level))):
        out = model.net(x, torch.full((x.shape[0],), float(i), device=x.device))
        eps, v = out[:, :c], out[:, c:]
        frac = (v + 1) / 2
        logvar = frac * max_log[i] + (1 - frac) * min_log[i]
        x0 = (math.sqrt(1 / a["abar"][i]) * x - math.sqrt(1 / a["abar"][i] - 1) * eps).clamp(-1, 1)
        mean = coef1[i] * x0 + coef2[i] * x
        x = mean + torch.exp(0.5 * logvar) * noise(k, x) if i > 0 else mean
    return x


def sdedit_loop(x_t: torch.Tensor, model: ScoreModel, level: int, noise, var_type: str = "fixedsmall"
                ) -> torch.Tensor:
    """SDEdit's ancestral step for t = level-1 .. 0 from x_t (B, C, H, W): mean ``(x - beta / sqrt(1 - abar) eps) /
    sqrt(1 - beta)``, noise ``exp(logvar / 2) z`` (fixedsmall or fixedlarge) except at t = 0; ``model.net(x, t)``
    takes the integer step."""
    a = official_levels(model.schedule)
    betas, abar, post_var = a["betas"], a["abar"], a["post_var"]
    logvar = (np.log(np.maximum(post_var, 1e-20)) if var_type == "fixedsmall"
              else np.log(np.append(post_var[1], betas[1:])))
    x = x_t
    for k, i in enumerate(reversed(range(level))):
        eps = model.net(x, torch.full((x.shape[0],), i, device=x.device))
        mean = (x - betas[i] / math.sqrt(1 - abar[i]) * eps) / math.sqrt(1 - betas[i])
        x = mean + math.exp(0.5 * logvar[i]) * noise(k, x) if i > 0 else mean
    return x
