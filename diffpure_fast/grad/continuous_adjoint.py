"""grad_mode="adjoint": the official code's continuous adjoints: torchsde's (``sdeint_adjoint``) for DiffPure's reverse
SDE, torchdiffeq's (``odeint_adjoint``) for its probability-flow ODE (``OdeAdjoint``, below).

This is the gradient the official DiffPure code reports, kept for parity. It is *not* the gradient of the discrete
computation: it integrates the adjoint SDE backward on its own grid and re-solves the state backward instead of
storing it, so it is exact only as dt -> 0 (the "full" mode is the exact one).

In torchsde's time s (forward s_0 = 1 - t* -> s_n = 1 - 1e-5), with f(s, y) = beta/2 y - beta/sigma eps(y, t) and
g = sqrt(beta) independent of y, torchsde's adjoint (Milstein for Ito diagonal noise, whose Stratonovich corrections
and Milstein terms vanish because dg/dy = 0) reduces to Euler steps on the augmented state over the backward grid
tau = -s accumulated in the state's dtype from -s_n by dt (the last step is the shorter one, so the grid is shifted
against the forward grid):

    y <- y - f(s, y) h - g(s) (W(s) - W(s - h)),        a <- a + h J_f(s, y)^T a,

both evaluated at the current (s, y, a). The Brownian path is the forward one: between forward grid points it is
filled in by Brownian bridges drawn from the counter generator, so memory stays O(1) in the step count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..chain import Noise, reverse_solve
from ..models.base import network_vjp
from ..noise import STREAM_REVERSE, sample_noise
from ..schedule import VPSchedule
from ..solvers.base import sigma_in
from ..solvers.euler import T_END, reverse_time_grid
from ..solvers.ode import torchdiffeq_grid
from .discrete_adjoint import GraphGuard

__all__ = ["STREAM_BRIDGE", "BridgedBrownian", "ContinuousAdjoint", "OdeAdjoint", "backward_time_grid"]

STREAM_BRIDGE = 2  # counter stream of the bridge points (streams 0/1: forward noise, solver increments)


def backward_time_grid(t_star: float, dt: float, dtype=np.float32) -> np.ndarray:
    """torchsde's adjoint grid, as times s (decreasing) from 1 - 1e-5 to 1 - t*: tau = -s accumulated by dt."""
    tau = dtype(-dtype(1.0 - T_END))
    end = dtype(-dtype(1.0 - t_star))
    step = dtype(dt)
    out = [tau]
    while tau < end:
        tau = min(dtype(tau + step), end)
        out.append(tau)
    return -np.asarray(out, dtype=dtype)


class BridgedBrownian:
    """The forward Brownian path W(s), queried backward in time (decreasing s), relative to W(s_n) = 0.

    At forward grid points W comes from the forward increments (given, or regenerated from their counters);
    between them it is a Brownian bridge, sampled from the last known point on the right towards the interval's
    left anchor, with counter noise keyed by (interval k, j-th point in it). Memory: a few images."""

    def __init__(self, grid: np.ndarray, noise: Noise, like: torch.Tensor):
        self.grid = grid.astype(np.float64)
        self.noise, self.like = noise, like
        self.k = len(grid) - 2                                  # current forward interval [grid[k], grid[k+1]]
        self.right = (self.grid[-1], torch.zeros_like(like))    # last known point (s, W(s))
        self.w_left = self.right[1] - self._increment(self.k)   # W(grid[k])
        self.j = 0

    def _increment(self, k: int) -> torch.Tensor:
        n = self.noise
        if n.increments is not None:
            return n.increments[k]
        h = self.grid[k + 1] - self.grid[k]  # exact: a difference of nearby float32 grid values
        return sample_noise(n.seed, n.sample_ids, k, STREAM_REVERSE, self.like) * math.sqrt(h)

    def value(self, s: float) -> torch.Tensor:
        s = float(s)
        while self.k > 0 and s < self.grid[self.k]:
            self.right = (self.grid[self.k], self.w_left)
            self.k -= 1
            self.w_left = self.w_left - self._increment(self.k)
            self.j = 0
        s_left = self.grid[self.k]
        r, w_r = self.right
        if s <= s_left:
            w = self.w_left
        elif s >= r:
            w = w_r
        else:
            mean = self.w_left + (s - s_left) / (r - s_left) * (w_r - self.w_left)
            std = math.sqrt((s - s_left) * (r - s) / (r - s_left))
            n = self.noise
            w = mean + std * sample_noise(n.seed, n.sample_ids, self.k, STREAM_BRIDGE + self.j, self.like)
            self.j += 1
        self.right = (s, w)
        return w


def _solve_and_keep(ctx, x_t: torch.Tensor, model, plan, noise: Noise, **keep) -> torch.Tensor:
    """The forward pass of a continuous adjoint: the reverse solve without a graph, its output saved (the backward
    pass re-solves the state from it), ``keep`` stored on ctx."""
    out = reverse_solve(x_t.detach(), model, plan, noise)
    ctx.save_for_backward(out)
    for k, v in dict(keep, model=model, noise=noise).items():
        setattr(ctx, k, v)
    return out


def _saved(ctx):
    """What both adjoints' backward start from: the checked graph, the kept output y, the model, the schedule, and
    the NumPy dtype of the time grids (the state's precision, as torchsde and torchdiffeq build them)."""
    ctx.guard.check("purify(grad_mode='adjoint') backward")
    (y,) = ctx.saved_tensors
    return y, ctx.model, ctx.schedule, (np.float64 if y.dtype == torch.float64 else np.float32)


class ContinuousAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, model, plan, noise: Noise, t_star: float, dt: float, schedule: VPSchedule,
                guard: GraphGuard, brownian_factory):
        return _solve_and_keep(ctx, x_t, model, plan, noise, t_star=t_star, dt=dt, schedule=schedule, guard=guard,
                               brownian_factory=brownian_factory)

    @staticmethod
    def backward(ctx, grad_out):
        y, model, sched, np_dtype = _saved(ctx)
        fwd_grid = reverse_time_grid(ctx.t_star, ctx.dt, np_dtype)
        bwd_grid = backward_time_grid(ctx.t_star, ctx.dt, np_dtype)
        brownian = (ctx.brownian_factory or BridgedBrownian)(fwd_grid, ctx.noise, y)
        a = grad_out
        y = y.detach()
        w_hi = brownian.value(bwd_grid[0])
        for s_hi, s_lo in zip(bwd_grid[:-1], bwd_grid[1:]):
            h = float(np_dtype(s_hi - s_lo))
            t = float(np_dtype(1.0) - s_hi)
            beta = sched.beta(t)
            coef = beta / sched.sigma(t)
            w_lo = brownian.value(s_lo)
            yk = y.requires_grad_(True)
            with torch.enable_grad():
                eps = model.eps(yk, torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device))
            (vjp,) = network_vjp(model, eps, yk, a)
            f = 0.5 * beta * y.detach() - coef * eps.detach()
            y = y.detach() - f * h - math.sqrt(beta) * (w_hi - w_lo)
            a = a + h * (0.5 * beta * a - coef * vjp)
            w_hi = w_lo
            del yk, eps, vjp
        return a, None, None, None, None, None, None, None, None


class OdeAdjoint(torch.autograd.Function):
    """torchdiffeq's ``odeint_adjoint`` for the probability-flow ODE of ``solvers.ode`` (DiffPure's ``ode`` runner,
    whose gradient it is): not the gradient of the Euler steps that ran, but Euler on the adjoint ODE.

    torchdiffeq solves the augmented state ``[y, a]`` backward from ``t = 1e-5`` to ``t*`` (two negations of time
    cancel) with the forward method and ``step_size``, on its own grid ``1e-5 + j h`` (so shifted against the
    forward grid), re-solving y instead of storing it:

        y <- y + h f(t, y),        a <- a - h J_f(t, y)^T a,        f = -beta/2 y + beta / (2 sigma) eps(y, t),

    both at the current (t, y, a). ``sigma`` in the state's dtype, as in the forward plan (``solvers.ode``).
    Parameters get no gradient (DiffPure's runner passes them all to the adjoint; they do not change d/dx)."""

    @staticmethod
    def forward(ctx, x_t, model, plan, noise: Noise, t_star: float, step_size: float, schedule: VPSchedule,
                guard: GraphGuard):
        return _solve_and_keep(ctx, x_t, model, plan, noise, t_star=t_star, step_size=step_size, schedule=schedule,
                               guard=guard)

    @staticmethod
    def backward(ctx, grad_out):
        y, model, sched, np_dtype = _saved(ctx)
        # odeint's ts = linspace(t*, 1e-5, 2) in the state's dtype; the backward solve walks it upward.
        ts = np.asarray([ctx.t_star, T_END], dtype=np_dtype)
        grid = torchdiffeq_grid(ts[1], ts[0], ctx.step_size, np_dtype)
        a, y = grad_out, y.detach()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h = float(np_dtype(t1 - t0))
            t = float(t0)
            beta = sched.beta(t)
            coef = 0.5 * beta / sigma_in(sched, t, np_dtype)
            yk = y.requires_grad_(True)
            with torch.enable_grad():
                eps = model.eps(yk, torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device))
            (vjp,) = network_vjp(model, eps, yk, a)
            y = y.detach() + h * (coef * eps.detach() - 0.5 * beta * y.detach())
            a = a + h * (0.5 * beta * a - coef * vjp)
            del yk, eps, vjp
        return a, None, None, None, None, None, None, None
