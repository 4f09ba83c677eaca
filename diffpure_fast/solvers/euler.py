"""Euler–Maruyama on DiffPure's reverse VP-SDE, on torchsde's float32 time grid.

In torchsde's time ``s = 1 - t`` (DiffPure integrates from ``s = 1 - t*`` to ``s = 1 - 1e-5``) the reverse SDE is

    dx = [beta(t)/2 x + beta(t) score(x, t)] ds + sqrt(beta(t)) dW_s,    score = -eps / sigma(t),

and one Euler–Maruyama step of length h from s_k is

    x_{k+1} = (1 + h beta/2) x_k - (h beta / sigma) eps(x_k, t_k) + sqrt(beta) dW_k,    dW_k ~ N(0, h).
"""

from __future__ import annotations

import math

import numpy as np

from .._validate import OptionError
from ..schedule import VPSchedule
from .base import Plan, Solver, Step

__all__ = ["T_END", "EulerMaruyama", "reverse_time_grid"]

# DiffPure stops the reverse solve at t = 1e-5 (epsilon_dt1), not at 0, where sigma(t) vanishes.
T_END = 1e-5


def reverse_time_grid(t_star: float, dt: float, dtype=np.float32) -> np.ndarray:
    """torchsde's solver grid for ``ts = [1 - t*, 1 - 1e-5]``, as ``sdeint(..., dt=dt)`` walks it.

    torchsde holds the current time as a tensor of ``ts``'s dtype (float32 in DiffPure) and advances it by
    ``min(t + dt, t_end)``, so the grid is accumulated in that dtype and its last step is shorter (0.99e-3 for
    t* = 0.1)."""
    s = dtype(1.0 - t_star)
    end = dtype(1.0 - T_END)
    step = dtype(dt)
    grid = [s]
    while s < end:
        s = min(dtype(s + step), end)
        grid.append(s)
    return np.asarray(grid, dtype=dtype)


class EulerMaruyama(Solver):
    name = "euler"
    strong_order = 0.5  # additive noise: EM is in fact strong order 1.0 here, see tests/test_solvers.py

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32) -> Plan:
        if steps is not None:
            if dt is not None:
                raise OptionError("dt", lambda s: f"give a step size {s.name('dt')} or a step count "
                                                  f"{s.name('steps')}, not both")
            # A step count means exactly that many equal steps (accumulating dt could add a sliver of a step).
            grid = np.linspace(dtype(1.0 - t_star), dtype(1.0 - T_END), steps + 1).astype(dtype)
        else:
            grid = reverse_time_grid(t_star, dt, dtype)
        out = []
        for s0, s1 in zip(grid[:-1], grid[1:]):
            h = float(dtype(s1 - s0))
            t = float(dtype(1.0) - s0)
            beta = schedule.beta(t)
            out.append(Step(t=t, level=None, a=1.0 + 0.5 * h * beta, b=-h * beta / schedule.sigma(t),
                            c_unit=math.sqrt(beta * h), c_increment=math.sqrt(beta)))
        return Plan(self.name, tuple(out), "Brownian increments dW_k ~ N(0, h_k) of torchsde's reverse-time grid")
