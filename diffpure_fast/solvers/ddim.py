"""DDIM (Song, Meng, Ermon, ICLR 2021, eq. 12 and 16), with eta from 0 (deterministic: the probability-flow ODE's
first-order exponential integrator, = DPM-Solver-1) to 1 (ancestral: the DDPM posterior).

From the state at t to the next time s < t, with ``alpha_bar`` the schedule's cumulative product:

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps(x_t, t)) / sqrt(alpha_bar_t)
    x_s    = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps(x_t, t) + sigma z,
    sigma  = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s),

so ``a = sqrt(alpha_bar_s / alpha_bar_t)``, ``b = sqrt(1 - alpha_bar_s - sigma^2) - a sqrt(1 - alpha_bar_t)``,
``c = sigma``. Time grids:

* ``"uniform"``, ``"logSNR"``, ``"quadratic"`` (``solvers.grids``): the continuous schedule from t* to 1e-5,
  the network at each grid time;
* ``"levels"``: the discrete schedule on the ``ddpm`` solver's respaced levels ``L-1 > ... > 0`` (L = round(N t*)),
  the last step to alpha_bar = 1, the network given each level. With eta = 1 this is the ``ddpm`` solver's chain
  (the DDIM paper's remark after eq. 16; tested), with eta = 0 guided-diffusion's ``ddim_sample_loop`` without
  clipping.
"""

from __future__ import annotations

import math

import numpy as np

from .._validate import OptionError
from ..schedule import VPSchedule
from .base import Plan, Solver, Step
from .ddpm import level_time, respaced_levels
from .euler import T_END
from .grids import TIME_GRIDS, check_steps, step_times

__all__ = ["DDIM", "DDIM_GRIDS", "ddim_coefficients"]

DDIM_GRIDS = (*TIME_GRIDS, "levels")


def ddim_coefficients(ab_t: float, ab_s: float, eta: float) -> tuple[float, float, float]:
    """(a, b, c) of one DDIM step from alpha_bar_t to alpha_bar_s >= alpha_bar_t (module docstring)."""
    sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
    a = math.sqrt(ab_s / ab_t)
    b = math.sqrt(max(1.0 - ab_s - sigma * sigma, 0.0)) - a * math.sqrt(1.0 - ab_t)
    return a, b, sigma


class DDIM(Solver):
    name = "ddim"
    strong_order = 0.0  # a discrete chain (eta = 0: first order in lambda as an ODE solver)
    options = {"eta": 0.0, "time_grid": "uniform"}

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32, eta: float = 0.0, time_grid: str = "uniform") -> Plan:
        n = check_steps(self.name, t_star, dt, steps, time_grid, grids=DDIM_GRIDS)
        if not 0.0 <= eta <= 1.0:
            raise OptionError("eta", f"DDIM's eta: expected a value in [0, 1], got {eta!r}")
        if time_grid == "levels":
            level = schedule.level_of(t_star)
            if level < 1:
                raise OptionError("t_star", f"the levels grid needs round({schedule.num_levels} t*) >= 1, got "
                                            f"{t_star}")
            levels = respaced_levels(level, n)
            abar = schedule.discrete_alpha_bar().tolist()
            pairs = [(level_time(schedule, lk), lk, abar[lk],
                      abar[levels[k + 1]] if k + 1 < len(levels) else 1.0) for k, lk in enumerate(levels)]
        else:
            ts = step_times(schedule, t_star, T_END, n, time_grid, dtype)
            pairs = [(t, None, schedule.alpha_bar(t), schedule.alpha_bar(s)) for t, s in zip(ts[:-1], ts[1:])]
        out = []
        for t, level, ab_t, ab_s in pairs:
            a, b, c = ddim_coefficients(ab_t, ab_s, eta)
            out.append(Step(t=t, level=level, a=a, b=b, c_unit=c, c_increment=c))
        meaning = None if eta == 0.0 else "standard normal draws z_k (scaled by DDIM's sigma_k inside the step)"
        return Plan(self.name, tuple(out), meaning)
