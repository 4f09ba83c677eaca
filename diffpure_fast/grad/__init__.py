"""Gradients through purification: ``grad_mode`` "full" (exact adjoint of the whole chain, guidance included),
"adjoint" (the official continuous adjoints: torchsde's for DiffPure's SDE, torchdiffeq's for its ODE) and
"surrogate" (exact gradient of a shorter unguided DDPM chain); "bpda" (identity backward) is a straight-through in
``diffpure_fast.engine.purify``.

Every mode does its backward work inside ``autograd.Function.backward``: nothing calls autograd during the forward
pass for the attacker's graph (AutoAttack's checks flag models that do).
"""

from __future__ import annotations

import torch

from ..chain import Chain, Noise, Round, run_chain, start_state
from ..config import PurifyConfig
from ..models.base import ScoreModel
from ..solvers.base import Plan
from .continuous_adjoint import BridgedBrownian, ContinuousAdjoint, OdeAdjoint
from .discrete_adjoint import ChainAdjoint, GraphGuard

__all__ = ["BridgedBrownian", "ChainAdjoint", "ContinuousAdjoint", "GraphGuard", "OdeAdjoint", "differentiable_chain",
           "differentiable_reverse_solve"]


def _guard(x: torch.Tensor, model: ScoreModel) -> GraphGuard:
    return GraphGuard(**{"the input x": x, "a score-network parameter or buffer":
                         list(model.parameters()) + list(model.buffers())})


def _params(model: ScoreModel, cfg: PurifyConfig) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad] if cfg.param_grads else []


def differentiable_chain(x_in: torch.Tensor, model: ScoreModel, chain: Chain, noise: Noise, cfg: PurifyConfig, *,
                         x_user: torch.Tensor, brownian_factory=None, expose: tuple[int, ...] = ()):
    """The chain from x_in (B, C, H, W) in [-1, 1] with a backward pass of the kind ``cfg.grad_mode`` names.

    x_user: the caller's input tensor, watched for in-place changes between forward and backward. expose: global
    step indices whose states are returned after the output (``(y, x_k, ...)``; grad_mode "full" only)."""
    mode = cfg.grad_mode
    if expose and mode != "full":
        raise ValueError(f"grad_mode: intermediate states have an exact gradient only with grad_mode='full', got "
                         f"{mode!r}")
    if mode == "full":
        return ChainAdjoint.apply(x_in, model, chain, noise, cfg.grad_cache_steps, _guard(x_user, model),
                                  tuple(expose), *_params(model, cfg))
    if mode == "adjoint":
        # DiffPure's sde and ode runners only (checked by PurifyConfig): the start state with autograd, then the
        # official code's continuous adjoint of the reverse solve.
        (rnd,) = chain.rounds
        x_t = start_state(x_in, rnd, 0, noise, x_in)
        opts = cfg.options
        if opts.diffusion_type == "ode":
            return OdeAdjoint.apply(x_t, model, rnd.plan, noise, opts.t_star, opts.step_size, cfg.schedule,
                                    _guard(x_user, model))
        return ContinuousAdjoint.apply(x_t, model, rnd.plan, noise, opts.t_star, opts.dt, cfg.schedule,
                                       _guard(x_user, model), brownian_factory)
    if mode == "surrogate":
        with torch.no_grad():
            out = run_chain(x_in.detach(), model, chain, noise)
        # Same start noise and seed, the surrogate's own solver steps (no caller-given increments).
        sur_noise = Noise(seed=noise.seed, sample_ids=noise.sample_ids, forward=noise.forward)
        sur = ChainAdjoint.apply(x_in, model, cfg.surrogate_chain(x_in.dtype), sur_noise, 0, _guard(x_user, model),
                                 ())
        # Forward value: the defended purification; gradient: that of the surrogate chain.
        return out + (sur - sur.detach())
    raise ValueError(f"grad_mode: no differentiable solve for {mode!r}")


def differentiable_reverse_solve(x_t: torch.Tensor, model: ScoreModel, plan: Plan, noise: Noise,
                                 cfg: PurifyConfig, *, x_in: torch.Tensor, brownian_factory=None) -> torch.Tensor:
    """An unguided reverse solve of ``plan`` from an already diffused x_t (B, C, H, W), with the backward pass of
    ``cfg.grad_mode`` ("full" or "adjoint"); x_in: the tensor watched for in-place changes."""
    chain = Chain((Round(plan, 1.0, 0.0),))
    return differentiable_chain(x_t, model, chain, noise, cfg, x_user=x_in, brownian_factory=brownian_factory)
