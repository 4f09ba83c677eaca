"""DPM-Solver++(2M) (Lu, Zhou, Bao, Chen, Li, Zhu 2022b, Algorithm 2): the multistep second-order solver of the
probability-flow ODE in its data-prediction form.

On a grid t_0 = t* > t_1 > ... > t_n = 1e-5 (``solvers.grids``), with ``x0_i = (x_i - sigma_i eps(x_i, t_i)) /
alpha_i`` the data prediction and ``h_i = lambda_{i+1} - lambda_i``:

    x_1     = (sigma_1 / sigma_0) x_0 - alpha_1 (e^{-h_0} - 1) x0_0                          (first order)
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i,
    D_i     = (1 + 1 / (2 r_i)) x0_i - (1 / (2 r_i)) x0_{i-1},   r_i = h_{i-1} / h_i.

One network call per step; the previous data prediction is the step's history term (``a_prev``, ``b_prev`` on
x_{i-1} and eps(x_{i-1})). As the official sampler's default ``lower_order_final=True`` does
(``DPM_Solver.sample``, ``dpm_solver_pytorch.py``), below 10 steps the last step is first order (D = x0_i): with
few steps the last interval is the longest in lambda (to lambda(1e-5) = 6.9 from about 2.6 at the last uniform
grid point of 5 steps from t* = 0.1), and the second-order extrapolation over it is unstable.
"""

from __future__ import annotations

import math

import numpy as np

from ..schedule import VPSchedule
from .base import Plan, Solver, Step
from .euler import T_END
from .grids import alpha_sigma, check_steps, half_log_snr, step_times

__all__ = ["LOWER_ORDER_FINAL_BELOW", "DPMSolverPP"]

# The official sampler's lower_order_final applies below this many steps.
LOWER_ORDER_FINAL_BELOW = 10


class DPMSolverPP(Solver):
    name = "dpm-solver++"
    options = {"time_grid": "uniform"}

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32, time_grid: str = "uniform") -> Plan:
        n = check_steps(self.name, t_star, dt, steps, time_grid)
        ts = step_times(schedule, t_star, T_END, n, time_grid, dtype)
        al, sg = zip(*(alpha_sigma(schedule, t) for t in ts))
        lam = [half_log_snr(schedule, t) for t in ts]
        out = []
        for i in range(n):
            h = lam[i + 1] - lam[i]
            phi = -al[i + 1] * math.expm1(-h)   # the weight of D_i
            second = i > 0 and not (n < LOWER_ORDER_FINAL_BELOW and i == n - 1)
            w0, w1 = (1.0, 0.0) if not second else (1.0 + 0.5 * h / (lam[i] - lam[i - 1]),
                                                   -0.5 * h / (lam[i] - lam[i - 1]))
            # x0_j = x_j / alpha_j - (sigma_j / alpha_j) eps_j
            out.append(Step(t=ts[i], level=None, a=sg[i + 1] / sg[i] + phi * w0 / al[i], b=-phi * w0 * sg[i] / al[i],
                            c_unit=0.0, c_increment=0.0,
                            a_prev=phi * w1 / al[i - 1] if second else 0.0,
                            b_prev=-phi * w1 * sg[i - 1] / al[i - 1] if second else 0.0))
        return Plan(self.name, tuple(out), None)
