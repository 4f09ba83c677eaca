"""DiffPure's purification re-created over torchsde, the reference for outputs and gradients.

``RevVPSDE`` follows the official ``runners/diffpure_sde.py`` class: in torchsde's time s = 1 - t the drift is
``-(f(x, t) - g(t)^2 score(x, t))`` and the diffusion ``sqrt(beta(t))`` per pixel (diagonal noise, Ito), with the
state flattened to (B, C*H*W). ``ReplayBrownian`` feeds given increments to ``torchsde.sdeint`` so both sides see
identical noise.
"""

from __future__ import annotations

import torch
import torchsde  # a dev dependency: this module serves the tests and benchmarks only

from ..models.base import ScoreModel
from ..schedule import DIFFPURE_SCHEDULE, VPSchedule
from ..solvers.euler import T_END

__all__ = ["ReplayBrownian", "RevVPSDE", "TorchsdeBrownianWalker", "forward_increments", "torchsde_purify",
           "torchsde_ts"]


class RevVPSDE(torch.nn.Module):
    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, model: ScoreModel, img_shape, schedule: VPSchedule = DIFFPURE_SCHEDULE):
        super().__init__()
        self.model = model
        self.img_shape = tuple(img_shape)
        self.schedule = schedule

    def _beta(self, s, batch):
        t = (1 - s).expand(batch)
        return t, self.schedule.beta_min + t * (self.schedule.beta_max - self.schedule.beta_min)

    def f(self, s, y):
        t, beta = self._beta(s, y.shape[0])
        x = y.view(-1, *self.img_shape)
        score = self.model.score(x, t)
        drift = -0.5 * beta[:, None] * y - beta[:, None] * score.flatten(1)
        return -drift

    def g(self, s, y):
        _, beta = self._beta(s, y.shape[0])
        return torch.sqrt(beta)[:, None].expand(y.shape)


class ReplayBrownian(torchsde.BaseBrownian):
    """A torchsde Brownian motion that answers each forward-grid query (s_k, s_{k+1}) with the given dW_k."""

    levy_area_approximation = "none"

    def __init__(self, grid: torch.Tensor, increments: torch.Tensor):
        super().__init__()
        self.grid = grid
        self.inc = increments.flatten(2)  # (steps, B, C*H*W)

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        k = int(torch.argmin((self.grid - ta).abs()))
        if tb is not None and abs(float(self.grid[k + 1] - tb)) > 1e-7:
            raise ValueError(f"ReplayBrownian: query ({float(ta)}, {float(tb)}) is not a forward grid step")
        return self.inc[k]

    def __repr__(self):
        return "ReplayBrownian()"

    dtype = property(lambda self: self.inc.dtype)
    device = property(lambda self: self.inc.device)
    shape = property(lambda self: self.inc.shape[1:])


class TorchsdeBrownianWalker:
    """Answers the backward-in-time Brownian queries of ``grad_mode="adjoint"`` (``value(s)`` for decreasing s,
    relative to the first point) from a torchsde Brownian motion, so both adjoints walk the same path.
    Use as ``brownian_factory=lambda grid, noise, like: TorchsdeBrownianWalker(bm, like)``."""

    def __init__(self, bm, like: torch.Tensor):
        self.bm, self.like = bm, like
        self.s = self.w = None

    def value(self, s) -> torch.Tensor:
        s = torch.tensor(s, dtype=self.like.dtype, device=self.like.device)
        if self.s is None:
            self.w = torch.zeros_like(self.like)
        else:
            self.w = self.w - self.bm(s, self.s).view_as(self.like)
        self.s = s
        return self.w


def forward_increments(bm, grid, like: torch.Tensor) -> torch.Tensor:
    """The increments (steps, *like.shape) of torchsde Brownian motion ``bm`` on the forward solver grid."""
    g = torch.as_tensor(grid, dtype=like.dtype, device=like.device)
    return torch.stack([bm(g[k], g[k + 1]).view_as(like) for k in range(len(g) - 1)])


def torchsde_ts(t_star: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The official ``ts``: linspace(1 - t*, 1 - 1e-5, 2) (float32 in DiffPure)."""
    return torch.linspace(1.0 - t_star, 1.0 - T_END, 2, device=device, dtype=dtype)


def torchsde_purify(x_t: torch.Tensor, model: ScoreModel, t_star: float, *, increments=None, bm=None, dt=1e-3,
                    adjoint=False, adjoint_params=None, grid=None):
    """Reverse solve of DiffPure with torchsde from the diffused x_t (B, C, H, W) in [-1, 1]; returns x_0.

    increments: (steps, B, C, H, W) dW on the forward grid ``grid`` (replayed exactly), or ``bm``: a torchsde
    Brownian motion, or neither (torchsde's default BrownianInterval)."""
    sde = RevVPSDE(model, x_t.shape[1:])
    ts = torchsde_ts(t_star, x_t.device, x_t.dtype)
    if increments is not None:
        bm = ReplayBrownian(grid.to(x_t.device, x_t.dtype), increments)
    y0 = x_t.flatten(1)
    if adjoint:
        kw = {} if adjoint_params is None else {"adjoint_params": adjoint_params}
        ys = torchsde.sdeint_adjoint(sde, y0, ts, method="euler", dt=dt, bm=bm, **kw)
    else:
        ys = torchsde.sdeint(sde, y0, ts, method="euler", dt=dt, bm=bm)
    return ys[-1].view_as(x_t)
