"""Ancestral DDPM sampling on the discrete schedule (Ho et al. 2020), respaced to a given step count.

From DiffPure's level L = round(N t*) the chain visits levels ``l_0 = L-1 > l_1 > ... > l_{n-1} = 0`` (evenly
spaced, as guided-diffusion's timestep respacing does) and, with ``alpha_bar`` the discrete cumulative product and
``alpha_k = alpha_bar[l_k] / alpha_bar[l_{k+1}]`` (1 - the respaced beta),

    x_{k+1} = (x_k - (1 - alpha_k) / sqrt(1 - alpha_bar[l_k]) eps(x_k, l_k)) / sqrt(alpha_k) + sigma_k z_k,

with the posterior variance ``sigma_k^2 = (1 - alpha_k)(1 - alpha_bar[l_{k+1}]) / (1 - alpha_bar[l_k])`` and no
noise on the last step (to level "-1", alpha_bar = 1).
"""

from __future__ import annotations

import math

import numpy as np

from .._validate import OptionError
from ..schedule import VPSchedule
from .base import Plan, Solver, Step

__all__ = ["AncestralDDPM", "respaced_levels"]


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
            # A continuous-time network sees level l as t = (l + 1) / N: alpha_bar_disc[l] ~ alpha_bar_cont((l+1)/N).
            t = float(np.float32((lk + 1) / schedule.num_levels))
            out.append(Step(t=t, level=lk, a=1.0 / math.sqrt(alpha),
                            b=-(1.0 - alpha) / (math.sqrt(alpha) * math.sqrt(1.0 - ab)), c_unit=sd, c_increment=sd))
        return Plan(self.name, tuple(out), "standard normal draws z_k (scaled by the posterior std inside the step)")
