"""The probability-flow ODE of DiffPure's ``--diffusion_type ode`` (``runners/diffpure_ode.py``), by torchdiffeq's
fixed-grid Euler.

The official runner integrates

    dx/dt = f(t, x) = -beta(t)/2 x - beta(t)/2 score(x, t) = -beta(t)/2 x + beta(t) / (2 sigma(t)) eps(x, t)

from ``t = t*`` down to ``t = 1e-5`` with ``torchdiffeq.odeint_adjoint(..., method="euler",
options=dict(step_size=h))``. torchdiffeq integrates a decreasing span in negated time ``tau = -t`` on the grid
``tau_j = -t* + j h`` (``arange(niters) * h + start`` in the times' dtype, float32 in DiffPure, with
``niters = ceil((end - start) / h + 1)``), the last point replaced by the end ``-1e-5``; so the last step is the
shorter one. One step from ``t_k`` (length ``h_k = tau_{k+1} - tau_k``):

    x_{k+1} = x_k - h_k f(t_k, x_k) = (1 + h_k beta/2) x_k - h_k beta / (2 sigma) eps(x_k, t_k).

``sigma(t)`` is evaluated in the state's dtype, as the official code does (``1 - exp(...)`` in float32): at
``t = 1e-5`` float32's ``1 - exp(-1e-6)`` is off by up to 6%, and parity with ``odeint_adjoint``'s gradient, whose
backward pass starts there, needs the same value (the float64 value moves it by 1.5e-4 relative on the conformance
vectors).
"""

from __future__ import annotations

import numpy as np
import torch

from ..schedule import VPSchedule
from .base import Plan, Step, sigma_in, torch_dtype_of
from .euler import T_END

__all__ = ["ode_euler_plan", "torchdiffeq_grid"]


def torchdiffeq_grid(t0: float, t1: float, step_size: float, dtype=np.float32) -> np.ndarray:
    """The grid torchdiffeq's fixed-step solvers walk from ``t0`` to ``t1 > t0`` (``odeint`` with ``t =
    linspace(t0, t1, 2)`` in ``dtype`` and ``options=dict(step_size=...)``), computed with the same tensor
    operations as ``FixedGridODESolver._grid_constructor_from_step_size``.

    torchdiffeq returns the solution at ``t1`` from the first grid interval that reaches it (a linear
    interpolation inside it when an earlier point rounds past ``t1``): the grid returned here stops there, with
    ``t1`` itself as its last point, so every interval is one Euler step of the solve."""
    ts = torch.tensor([t0, t1], dtype=torch_dtype_of(dtype))
    start, end = ts[0], ts[-1]
    niters = torch.ceil((end - start) / step_size + 1).item()
    grid = torch.arange(0, niters, dtype=ts.dtype) * step_size + start
    grid[-1] = end
    stop = int(torch.nonzero(grid[1:] >= end)[0]) + 1   # the first point at or past the end
    grid = grid[:stop + 1]
    grid[-1] = end
    return grid.numpy()


def ode_euler_plan(schedule: VPSchedule, t_star: float, step_size: float, dtype=np.float32) -> Plan:
    """The Euler steps of the probability-flow ODE from ``t*`` to 1e-5 on torchdiffeq's negated-time grid (module
    docstring); deterministic (no noise term)."""
    if not t_star > T_END:
        raise ValueError(f"t_star: the ODE runs from t* down to {T_END}; expected t_star > {T_END}, got {t_star}")
    # odeint gets ts = linspace(t*, 1e-5, 2) (decreasing): torchdiffeq negates it; ts's float32 values negate exactly.
    ts = np.asarray([t_star, T_END], dtype=dtype)
    tau = torchdiffeq_grid(-ts[0], -ts[1], step_size, dtype)
    out = []
    for tau0, tau1 in zip(tau[:-1], tau[1:]):
        h = float(dtype(tau1 - tau0))
        t = float(-tau0)
        beta = schedule.beta(t)
        out.append(Step(t=t, level=None, a=1.0 + 0.5 * h * beta, b=-0.5 * h * beta / sigma_in(schedule, t, dtype),
                        c_unit=0.0, c_increment=0.0))
    return Plan("ode_euler", tuple(out), None)   # deterministic after the forward noise

