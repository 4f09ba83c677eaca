"""DiffPure's ODE purification re-created over torchdiffeq, the reference for the ``ode`` runner's output and both of
its gradients.

``VPODE`` follows the official ``runners/diffpure_ode.py`` class: ``dx/dt = -beta(t)/2 x - beta(t)/2 score(x, t)``
on the state flattened to (B, C*H*W), integrated from ``t*`` to 1e-5 by ``torchdiffeq.odeint(_adjoint)(...,
method="euler", options=dict(step_size=...))`` exactly as the runner calls it (a one-tuple state, ``ts =
linspace(t*, 1e-5, 2)``, atol = rtol = 1e-3, unused by Euler).
"""

from __future__ import annotations

import torch
import torchdiffeq  # a dev dependency: this module serves the tests and benchmarks only

from ..models.base import ScoreModel
from ..schedule import DIFFPURE_SCHEDULE, VPSchedule
from ..solvers.euler import T_END

__all__ = ["VPODE", "torchdiffeq_purify"]


class VPODE(torch.nn.Module):
    def __init__(self, model: ScoreModel, img_shape, schedule: VPSchedule = DIFFPURE_SCHEDULE):
        super().__init__()
        self.model = model
        self.img_shape = tuple(img_shape)
        self.schedule = schedule

    def forward(self, t, states):
        x = states[0]
        t = t.expand(x.shape[0])
        beta = self.schedule.beta(t)[:, None]
        score = self.model.score(x.view(-1, *self.img_shape), t).flatten(1)
        return (-0.5 * beta * x - 0.5 * beta * score,)


def torchdiffeq_purify(x_t: torch.Tensor, model: ScoreModel, t_star: float, *, step_size: float = 1e-3,
                       adjoint: bool = False, adjoint_params=None) -> torch.Tensor:
    """The ODE solve of DiffPure from the diffused x_t (B, C, H, W) in [-1, 1]; returns x at t = 1e-5.

    adjoint: ``odeint_adjoint`` (the official gradient); ``adjoint_params``: its parameters (default: every model
    parameter that requires grad, as in the official code; ``()`` for none)."""
    func = VPODE(model, x_t.shape[1:])
    ts = torch.linspace(t_star, T_END, 2, dtype=x_t.dtype, device=x_t.device)
    kw = dict(atol=1e-3, rtol=1e-3, method="euler", options=dict(step_size=step_size))
    if adjoint:
        if adjoint_params is not None:
            kw["adjoint_params"] = tuple(adjoint_params)
        states = torchdiffeq.odeint_adjoint(func, (x_t.flatten(1),), ts, **kw)
    else:
        states = torchdiffeq.odeint(func, (x_t.flatten(1),), ts, **kw)
    return states[0][-1].view_as(x_t)
