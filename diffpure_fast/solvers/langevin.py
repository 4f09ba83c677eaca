"""DiffPure's Langevin-dynamics SDE (``--diffusion_type ldsde``, ``runners/diffpure_ldsde.py``), by torchsde's
Euler–Maruyama.

No forward diffusion: the chain starts at the input ``x_in`` and runs Langevin dynamics at the fixed time
``t_ld = 0.01``, pulled back toward ``x_in``:

    dx = -lambda/2 (-score(x, t_ld) + (x - x_in) / sigma2) ds + sqrt(lambda) eta dW_s,

over torchsde's reversed time ``s`` from ``1 - t*`` to ``1 - 1e-5`` (``sdeint_adjoint(method="euler", dt=1e-2)``,
the float32 grid of ``solvers.euler.reverse_time_grid``). With ``score = -eps / sigma(t_ld)``, one step of length h:

    x_{k+1} = (1 - w_k) x_k - h lambda / (2 sigma(t_ld)) eps(x_k, t_ld) + w_k x_in + sqrt(lambda) eta dW_k,
    w_k = h lambda / (2 sigma2).

The official defaults: ``sigma2 = 1e-3``, ``lambda_ld = 1e-2``, ``eta = 5``; ``dt = 1e-2`` is fixed there (an option
here). The input enters every step through ``w_k x_in``: the chain's guidance term (``methods.diffpure``), so that
the exact gradient carries that path.
"""

from __future__ import annotations

import math

import numpy as np

from ..schedule import VPSchedule
from .base import Plan, Step, sigma_in
from .euler import reverse_time_grid

__all__ = ["LANGEVIN_T", "langevin_plan"]

# The runner's fixed diffusion time (``t = zeros_like(t) + 1e-2`` in float32).
LANGEVIN_T = float(np.float32(1e-2))


def langevin_plan(schedule: VPSchedule, t_star: float, dt: float, *, lambda_ld: float, sigma2: float, eta: float,
                  dtype=np.float32) -> tuple[Plan, tuple[float, ...]]:
    """The step plan (the state and network terms and the noise) and the anchor weights ``w_k`` of x_in."""
    sigma = sigma_in(schedule, LANGEVIN_T, dtype)
    noise = math.sqrt(lambda_ld) * eta
    grid = reverse_time_grid(t_star, dt, dtype)
    steps, anchors = [], []
    for s0, s1 in zip(grid[:-1], grid[1:]):
        h = float(dtype(s1 - s0))
        w = 0.5 * h * lambda_ld / sigma2
        steps.append(Step(t=LANGEVIN_T, level=None, a=1.0 - w, b=-0.5 * h * lambda_ld / sigma,
                          c_unit=noise * math.sqrt(h), c_increment=noise))
        anchors.append(w)
    return Plan("langevin_euler", tuple(steps), "Brownian increments dW_k ~ N(0, h_k) of torchsde's reverse-time "
                "grid (scaled by sqrt(lambda_ld) eta inside the step)"), tuple(anchors)
