"""Heun's method on DiffPure's reverse VP-SDE: torchsde's ``method="heun"`` (a predictor-corrector with the trapezoid
rule in the drift and the diffusion, Burrage, Burrage & Tian 2004), here with additive noise, where Ito and
Stratonovich agree.

In torchsde's time ``s = 1 - t`` the reverse SDE is ``dx = f(x, t) ds + g(t) dW`` with ``f = beta/2 x - beta/sigma
eps(x, t)`` and ``g = sqrt(beta)`` (``solvers.euler``). One step from t_k to t_{k+1} (``h = t_k - t_{k+1}``, one
increment dW ~ N(0, h)):

    x~      = x + h f(x, t_k) + g_k dW                                  (predictor: the Euler–Maruyama step)
    x_{k+1} = x + h/2 (f(x, t_k) + f(x~, t_{k+1})) + (g_k + g_{k+1})/2 dW   (corrector, the same dW)

Two network calls per step, so ``steps`` (network calls) must be even; the grid (``time_grid``, ``solvers.grids``)
has steps / 2 intervals from t* to 1e-5. As plan steps: the predictor is Euler's ``a x + b eps + c z``; the
corrector draws no noise of its own: the predictor's ``g_k dW = x~ - (1 + h beta_k/2) x + h beta_k/sigma_k eps(x)``
is recovered from what the chain holds, so with ``rho = (g_k + g_{k+1}) / (2 g_k)`` the corrector is

    x_{k+1} = (h beta_{k+1}/4 + rho) x~ - h beta_{k+1}/(2 sigma_{k+1}) eps(x~)
              + (1 + h beta_k/4 - rho (1 + h beta_k/2)) x + h beta_k/sigma_k (rho - 1/2) eps(x),

its second line the history term. A caller's increments (``purify(increments=...)``) are read at the predictor
steps (even k); a corrector's entry is multiplied by zero, as the ``ddpm`` solver's last entry is.
"""

from __future__ import annotations

import math

import numpy as np

from ..schedule import VPSchedule
from .base import Plan, Solver, Step
from .euler import T_END
from .grids import alpha_sigma, check_steps, step_times

__all__ = ["Heun"]


class Heun(Solver):
    name = "heun"
    strong_order = 1.0  # additive noise (Euler–Maruyama has it too here); the drift is integrated by the trapezoid
    options = {"time_grid": "uniform"}
    calls_per_step = 2

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32, time_grid: str = "uniform") -> Plan:
        n = check_steps(self.name, t_star, dt, steps, time_grid, calls=2)
        ts = step_times(schedule, t_star, T_END, n, time_grid, dtype)
        out = []
        for t0, t1 in zip(ts[:-1], ts[1:]):
            h = t0 - t1
            b0, b1 = schedule.beta(t0), schedule.beta(t1)
            s0, s1 = alpha_sigma(schedule, t0)[1], alpha_sigma(schedule, t1)[1]
            rho = 0.5 * (math.sqrt(b0) + math.sqrt(b1)) / math.sqrt(b0)
            out.append(Step(t=t0, level=None, a=1.0 + 0.5 * h * b0, b=-h * b0 / s0, c_unit=math.sqrt(b0 * h),
                            c_increment=math.sqrt(b0)))
            out.append(Step(t=t1, level=None, a=0.25 * h * b1 + rho, b=-0.5 * h * b1 / s1, c_unit=0.0,
                            c_increment=0.0, a_prev=1.0 + 0.25 * h * b0 - rho * (1.0 + 0.5 * h * b0),
                            b_prev=h * b0 / s0 * (rho - 0.5)))
        return Plan(self.name, tuple(out), "Brownian increments dW_k ~ N(0, h_k) at the predictor steps (even k; "
                    "a corrector step's entry is multiplied by zero: it reuses its predictor's increment)")
