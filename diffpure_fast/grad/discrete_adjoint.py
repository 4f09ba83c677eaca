"""grad_mode="full": the exact gradient of the discrete purification, in near-constant memory.

Every step is ``x_{k+1} = a_k x_k + b_k eps(x_k, t_k) + c_k z_k`` with noise that does not depend on x, so the
vector-Jacobian product of one step is

    g_k = a_k g_{k+1} + b_k J_eps(x_k)^T g_{k+1},

one VJP through the score network at the stored state x_k. The forward pass runs without a graph and keeps only
the states x_0..x_{n-1} (one image each; the noise is never stored); the backward pass walks the steps in reverse,
recomputes each network call with a graph, takes its VJP with respect to x_k only (the network's parameters get no
gradient and their weight-gradient kernels are never run), and frees it. A caller who asks for parameter gradients
(``param_grads=True``) passes the parameters as inputs; each step then adds ``b_k J_theta(x_k)^T g_{k+1}``.
Optionally the graphs of the last ``cache_steps`` steps are kept from the forward pass, so their recompute is
skipped when memory allows.
"""

from __future__ import annotations

import torch

from ..engine import Noise, model_eps
from ..models.base import ScoreModel
from ..solvers.base import Plan

__all__ = ["DiscreteAdjoint", "GraphGuard"]


class GraphGuard:
    """Remembers the version counters of the tensors a backward pass depends on, and names any that changed."""

    def __init__(self, **named):
        self.named = {k: v for k, v in named.items() if v is not None}
        self.versions = {k: self._versions(v) for k, v in self.named.items()}

    @staticmethod
    def _versions(obj):
        if isinstance(obj, torch.Tensor):
            return (obj._version,)
        return tuple(t._version for t in obj)

    def check(self, where: str):
        for name, obj in self.named.items():
            if self._versions(obj) != self.versions[name]:
                raise RuntimeError(
                    f"{where}: {name} was modified in place after purify() ran, so the gradient would not be the "
                    f"gradient of the computation that produced the output; purify again after modifying it")


class DiscreteAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, model: ScoreModel, plan: Plan, noise: Noise, cache_steps: int, guard: GraphGuard,
                *params):
        n = len(plan)
        first_cached = max(n - cache_steps, 0)
        states, cached = [], {}
        x = x_t.detach()
        for k, step in enumerate(plan.steps):
            states.append(x)
            if k < first_cached:
                eps = model_eps(model, x, step)
            else:
                # Keep this step's graph: x_k as a leaf, eps(x_k) with its autograd history.
                xk = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    eps_graph = model_eps(model, xk, step)
                cached[k] = (xk, eps_graph)
                eps = eps_graph.detach()
            x = noise.step(x, eps, k, step)
        ctx.model, ctx.plan, ctx.states, ctx.cached, ctx.guard = model, plan, states, cached, guard
        ctx.params = params
        return x

    @staticmethod
    def backward(ctx, grad_out):
        ctx.guard.check("purify(grad_mode='full') backward")
        model, plan, states, cached = ctx.model, ctx.plan, ctx.states, ctx.cached
        params = ctx.params
        param_grads = [torch.zeros_like(p) for p in params]
        g = grad_out
        for k in range(len(plan) - 1, -1, -1):
            step = plan.steps[k]
            if k in cached:
                # A kept graph serves one backward pass; a second one (retain_graph=True) recomputes the step.
                xk, eps = cached.pop(k)
            else:
                xk = states[k].detach().requires_grad_(True)
                with torch.enable_grad():
                    eps = model_eps(model, xk, step)
            vjp, *vjp_params = torch.autograd.grad(eps, (xk, *params), g, allow_unused=True)
            g = g * step.a + vjp * step.b
            for acc, vp in zip(param_grads, vjp_params):
                if vp is not None:
                    acc.add_(vp, alpha=step.b)
            del xk, eps, vjp, vjp_params
        return (g, None, None, None, None, None, *param_grads)
