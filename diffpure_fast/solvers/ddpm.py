"""Ancestral DDPM sampling on the discrete schedule (Ho et al. 2020), respaced to a given step count.

From DiffPure's level L = round(N t*) the chain visits levels ``l_0 = L-1 > l_1 > ... > l_{n-1} = 0`` (evenly
spaced, as guided-diffusion's timestep respacing does) and, with ``alpha_bar`` the discrete cumulative product and
``alpha_k = alpha_bar[l_k] / alpha_bar[l_{k+1}]`` (1 - the respaced beta),

    x_{k+1} = (x_k - (1 - alpha_k) / sqrt(1 - alpha_bar[l_k]) eps(x_k, l_k)) / sqrt(alpha_k) + sigma_k z_k,

with the posterior variance ``sigma_k^2 = (1 - alpha_k)(1 - alpha_bar[l_{k+1}]) / (1 - alpha_bar[l_k])`` and no
noise on the last step (to level "-1", alpha_bar = 1).

The per-level constants of the one-step-per-level samplers (``ddpm_levels``: guided-diffusion's
``GaussianDiffusion``, SDEdit's and pytorch_diffusion's ``Diffusion``, all float64 numpy from the same linear betas)
serve the samplers that walk every level: GDMP's, and DiffPure's ``ddpm`` (guided-diffusion's ``p_sample``) and
``celebahq-ddpm`` (SDEdit's step) runners.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import OptionError
from ..schedule import VPSchedule
from .base import Plan, Solver, Step

__all__ = ["VAR_TYPES", "AncestralDDPM", "DDPMLevel", "clipped_x0_correction", "ddpm_levels", "epsilon_mean_plan",
           "level_time", "posterior_mean_steps", "respaced_levels"]

# The fixed variances of SDEdit's / pytorch_diffusion's ``Diffusion`` (``config.model.var_type``).
VAR_TYPES = ("fixedsmall", "fixedlarge")


def respaced_levels(level: int, steps: int) -> list[int]:
    """``steps`` distinct levels from ``level - 1`` down to 0, evenly spaced (rounded)."""
    if steps > level:
        raise OptionError("steps", f"at most {level} DDPM steps from level {level} (one per level), got {steps}")
    if steps == 1:
        return [level - 1]
    return [int(v) for v in np.round(np.linspace(level - 1, 0, steps)).astype(np.int64)]


class AncestralDDPM(Solver):
    name = "ddpm"
    strong_order = 0.0  # a discrete chain, not a discretisation of an SDE in the strong sense

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32) -> Plan:
        if dt is not None:
            raise OptionError("dt", lambda s: f"{s.setting('solver', 'ddpm')} walks discrete levels; give "
                                              f"{s.name('steps')} (default: one per level)")
        level = schedule.level_of(t_star)
        if level < 1:
            raise OptionError("t_star", f"the DDPM solver needs round({schedule.num_levels} t*) >= 1, got {t_star}")
        levels = respaced_levels(level, level if steps is None else steps)
        alpha_bar = schedule.discrete_alpha_bar().tolist()
        out = []
        for k, lk in enumerate(levels):
            ab = alpha_bar[lk]
            ab_next = alpha_bar[levels[k + 1]] if k + 1 < len(levels) else 1.0
            alpha = ab / ab_next
            var = (1.0 - alpha) * (1.0 - ab_next) / (1.0 - ab)
            sd = math.sqrt(max(var, 0.0))
            out.append(Step(t=level_time(schedule, lk), level=lk, a=1.0 / math.sqrt(alpha),
                            b=-(1.0 - alpha) / (math.sqrt(alpha) * math.sqrt(1.0 - ab)), c_unit=sd, c_increment=sd))
        return Plan(self.name, tuple(out), "standard normal draws z_k (scaled by the posterior std inside the step)")


# ---------------------------------------------------------------------------------------------------------------
# One step per level: the official samplers' constants.


@dataclass(frozen=True)
class DDPMLevel:
    """The constants of level i (float64), as the official samplers compute them from ``betas`` in numpy:

    beta, alpha_bar: ``betas[i]``, ``cumprod(1 - betas)[i]``;
    coef1, coef2: the posterior mean ``coef1 x0 + coef2 x_i`` (``posterior_mean_coef1/2``);
    recip, recipm1: ``x0 = recip x_i - recipm1 eps`` (``sqrt_recip(m1)_alphas_cumprod``);
    logvar_small: ``log(max(posterior_variance, 1e-20))`` (SDEdit's "fixedsmall");
    logvar_large: ``log([posterior_variance[1], betas[1:]][i])`` ("fixedlarge");
    logvar_clipped: ``log([posterior_variance[1], posterior_variance[1:]][i])`` (guided-diffusion's
        ``posterior_log_variance_clipped``, the lower end of its learned range; the upper end is log beta).
    """

    beta: float
    alpha_bar: float
    coef1: float
    coef2: float
    recip: float
    recipm1: float
    logvar_small: float
    logvar_large: float
    logvar_clipped: float


@functools.cache
def ddpm_levels(schedule: VPSchedule) -> tuple[DDPMLevel, ...]:
    """Every level's :class:`DDPMLevel` for the schedule's discrete betas (cached per schedule)."""
    betas = schedule.discrete_betas().numpy()
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
    small = np.log(np.maximum(post_var, 1e-20))
    large = np.log(np.append(post_var[1], betas[1:]))
    clipped = np.log(np.append(post_var[1], post_var[1:]))
    return tuple(DDPMLevel(float(betas[i]), float(abar[i]), float(coef1[i]), float(coef2[i]),
                           float(np.sqrt(1.0 / abar[i])), float(np.sqrt(1.0 / abar[i] - 1.0)), float(small[i]),
                           float(large[i]), float(clipped[i])) for i in range(len(betas)))


def level_time(schedule: VPSchedule, level: int) -> float:
    """The continuous time a continuous-time network sees at level l: ``(l + 1) / N`` (alpha_bar_disc[l] ~
    alpha_bar_cont((l + 1) / N)), as a float32 value."""
    return float(np.float32((level + 1) / schedule.num_levels))


def posterior_mean_steps(schedule: VPSchedule, top: int, std: Callable[[DDPMLevel, int], float]) -> tuple[Step, ...]:
    """Steps over levels ``top-1 .. 0`` of the posterior mean of the *unclipped* x0,
    ``coef1 (recip x - recipm1 eps) + coef2 x``: a = coef1 recip + coef2, b = -coef1 recipm1, c = std(level, i).
    A sampler that clips x0 adds ``clipped_x0_correction`` as its step's guidance term."""
    levels = ddpm_levels(schedule)
    out = []
    for i in range(top - 1, -1, -1):
        lv = levels[i]
        c = std(lv, i)
        out.append(Step(t=level_time(schedule, i), level=i, a=lv.coef1 * lv.recip + lv.coef2,
                        b=-lv.coef1 * lv.recipm1, c_unit=c, c_increment=c))
    return tuple(out)


def clipped_x0_correction(lv: DDPMLevel, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``coef1 (clip(x0, -1, 1) - x0)`` with ``x0 = recip x - recipm1 eps``: what clipping x0 adds to the posterior
    mean of :func:`posterior_mean_steps` (guided-diffusion's ``clip_denoised=True``). Its derivative is zero where
    the clip is active (|x0| > 1: the clipped x0 no longer moves with x or eps) and cancels the unclipped mean's
    x0 term there; elsewhere the term and its derivative are zero."""
    x0 = x * lv.recip - eps * lv.recipm1
    return (x0.clamp(-1.0, 1.0) - x0) * lv.coef1


def epsilon_mean_plan(schedule: VPSchedule, top: int, var_type: str = "fixedsmall") -> Plan:
    """SDEdit's ``image_editing_denoising_step_flexible_mask`` (DiffPure's ``runners/diffpure_ddpm.py``) over levels
    ``top-1 .. 0``: ``x' = (x - beta / sqrt(1 - alpha_bar) eps) / sqrt(1 - beta) + exp(logvar / 2) z``, no noise at
    level 0; ``var_type`` "fixedsmall" (celeba.yml) or "fixedlarge" picks logvar."""
    if var_type not in VAR_TYPES:
        raise ValueError(f"var_type: expected one of {VAR_TYPES}, got {var_type!r}")
    levels = ddpm_levels(schedule)
    out = []
    for i in range(top - 1, -1, -1):
        lv = levels[i]
        logvar = lv.logvar_small if var_type == "fixedsmall" else lv.logvar_large
        c = math.exp(0.5 * logvar) if i > 0 else 0.0
        root = math.sqrt(1.0 - lv.beta)
        out.append(Step(t=level_time(schedule, i), level=i, a=1.0 / root,
                        b=-lv.beta / (math.sqrt(1.0 - lv.alpha_bar) * root), c_unit=c, c_increment=c))
    return Plan("ddpm_epsilon", tuple(out), "standard normal draws z_k (scaled by exp(logvar / 2) inside the step)")
