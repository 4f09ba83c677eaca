"""DPM-Solver (Lu, Zhou, Bao, Chen, Li, Zhu, NeurIPS 2022), noise-prediction form, orders 1 and 2 (singlestep):
the probability-flow ODE solved by exponential integrators in the half log-SNR lambda (``solvers.grids``).

On a grid t_0 = t* > t_1 > ... > t_K = 1e-5, with ``h_i = lambda_{t_{i+1}} - lambda_{t_i}``:

* order 1 (DPM-Solver-1, = DDIM with eta = 0; eq. 3.7):
  ``x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} (e^{h_i} - 1) eps(x_i, t_i)``;
* order 2 (DPM-Solver-2, Algorithm 1 with r1 = 1/2): the midpoint ``s_i = t(lambda_{t_i} + h_i / 2)``,

      u_i     = (alpha_{s_i} / alpha_i) x_i - sigma_{s_i} (e^{h_i / 2} - 1) eps(x_i, t_i)
      x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} (e^{h_i} - 1) eps(u_i, s_i).

Order 2 makes two network calls per interval: ``steps`` counts network calls (as for every solver here), so it must
be even, and the grid has steps / 2 intervals. As plan steps: the first stage is ``a x + b eps``; the second has
``a = 0`` and the history term ``a_prev = alpha_{i+1} / alpha_i`` on the state before the first stage.
Coefficients follow the official ``singlestep_dpm_solver_second_update`` (``dpm_solver_pytorch.py``, solver_type
"dpmsolver"): exponents from r1 h, alpha and sigma at the (rounded) midpoint time.
"""

from __future__ import annotations

import math

import numpy as np

from .._validate import OptionError
from ..schedule import VPSchedule
from .base import Plan, Solver, Step
from .euler import T_END
from .grids import alpha_sigma, check_steps, half_log_snr, step_times, time_of_half_log_snr

__all__ = ["DPM_SOLVER_ORDERS", "DPMSolver"]

DPM_SOLVER_ORDERS = (1, 2)


class DPMSolver(Solver):
    name = "dpm-solver"
    options = {"order": 2, "time_grid": "uniform"}

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32, order: int = 2, time_grid: str = "uniform") -> Plan:
        if order not in DPM_SOLVER_ORDERS:
            raise OptionError("order", f"DPM-Solver's order: expected one of {DPM_SOLVER_ORDERS}, got {order!r}")
        n = check_steps(self.name, t_star, dt, steps, time_grid, calls=order)
        ts = step_times(schedule, t_star, T_END, n, time_grid, dtype)
        out = []
        for t, s in zip(ts[:-1], ts[1:]):
            (al_t, _), (al_s, sg_s) = alpha_sigma(schedule, t), alpha_sigma(schedule, s)
            h = half_log_snr(schedule, s) - half_log_snr(schedule, t)
            if order == 1:
                out.append(Step(t=t, level=None, a=al_s / al_t, b=-sg_s * math.expm1(h), c_unit=0.0, c_increment=0.0))
                continue
            m = float(dtype(time_of_half_log_snr(schedule, half_log_snr(schedule, t) + 0.5 * h)))
            al_m, sg_m = alpha_sigma(schedule, m)
            out.append(Step(t=t, level=None, a=al_m / al_t, b=-sg_m * math.expm1(0.5 * h), c_unit=0.0,
                            c_increment=0.0))
            out.append(Step(t=m, level=None, a=0.0, b=-sg_s * math.expm1(h), c_unit=0.0, c_increment=0.0,
                            a_prev=al_s / al_t))
        return Plan(self.name, tuple(out), None)
