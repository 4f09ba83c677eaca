"""Gradients through purification: ``grad_mode`` "full" (exact discrete adjoint), "adjoint" (torchsde-style
continuous adjoint) and "surrogate" (exact gradient of a shorter DDPM chain); "bpda" (identity backward) is a
straight-through in ``diffpure_fast.engine.purify``.

Every mode does its backward work inside ``autograd.Function.backward``: nothing calls autograd during the forward
pass (AutoAttack's checks flag models that do).
"""

from __future__ import annotations

import torch

from ..engine import Noise, PurifyConfig, reverse_solve
from ..models.base import ScoreModel
from ..solvers.base import Plan
from .continuous_adjoint import BridgedBrownian, ContinuousAdjoint
from .discrete_adjoint import DiscreteAdjoint, GraphGuard

__all__ = ["BridgedBrownian", "ContinuousAdjoint", "DiscreteAdjoint", "GraphGuard", "differentiable_reverse_solve"]


def _guard(x: torch.Tensor, model: ScoreModel) -> GraphGuard:
    return GraphGuard(**{"the input x": x, "a score-network parameter or buffer":
                         list(model.parameters()) + list(model.buffers())})


def differentiable_reverse_solve(x_t: torch.Tensor, model: ScoreModel, plan: Plan, noise: Noise,
                                 cfg: PurifyConfig, *, x_in: torch.Tensor, brownian_factory=None) -> torch.Tensor:
    """The reverse solve from x_t (B, C, H, W) with a backward pass of the kind ``cfg.grad_mode`` names.

    x_in: the caller's input tensor, watched for in-place changes between forward and backward."""
    mode = cfg.grad_mode
    if mode == "full":
        params = [p for p in model.parameters() if p.requires_grad] if cfg.param_grads else []
        return DiscreteAdjoint.apply(x_t, model, plan, noise, cfg.grad_cache_steps, _guard(x_in, model), *params)
    if mode == "adjoint":
        if cfg.solver != "euler" or cfg.steps is not None:
            raise ValueError("grad_mode: 'adjoint' is torchsde's adjoint of DiffPure's Euler–Maruyama solve; it needs "
                             "solver='euler' with dt (not steps)")
        return ContinuousAdjoint.apply(x_t, model, plan, noise, cfg.t_star, cfg.dt, cfg.schedule,
                                       _guard(x_in, model), brownian_factory)
    if mode == "surrogate":
        with torch.no_grad():
            out = reverse_solve(x_t.detach(), model, plan, noise)
        sur_cfg = PurifyConfig(t_star=cfg.t_star, solver="ddpm", steps=min(cfg.surrogate_steps,
                               cfg.schedule.level_of(cfg.t_star)), value_range=cfg.value_range, schedule=cfg.schedule)
        sur_noise = Noise(seed=noise.seed, sample_ids=noise.sample_ids)
        sur = DiscreteAdjoint.apply(x_t, model, sur_cfg.plan(x_t.dtype), sur_noise, 0, _guard(x_in, model))
        # Forward value: the defended purification; gradient: that of the surrogate chain.
        return out + (sur - sur.detach())
    raise ValueError(f"grad_mode: no differentiable solve for {mode!r}")
