"""grad_mode="full": the exact gradient of a whole purification chain, guidance included, in near-constant memory.

Every step of a chain (``diffpure_fast.chain``) is ``x_{k+1} = a_k x_k + b_k eps(x_k) + c_k z_k + G_k(x_k, x_in)``
with noise that does not depend on the input, and every round starts from ``s_r y_{r-1} + n_r z_r``. The
vector-Jacobian product of one step is

    g_k = a_k g_{k+1} + J_{eps}(x_k)^T (b_k g_{k+1}) + J_{G_k, x}^T g_{k+1},     g_in += J_{G_k, x_in}^T g_{k+1},

and a step with a history term ``p_k x_{k-1} + q_k eps(x_{k-1})`` (multistep and two-stage solvers) adds
``p_k g_{k+1}`` to g_{k-1} and ``q_k g_{k+1}`` to the cotangent of eps(x_{k-1}) before its one VJP: still one VJP
per step, and nothing stored beyond the states.

with the second-order terms inside ``J_{G_k}`` where the guidance is itself a gradient (a double backward through
the network where it depends on it). The forward pass runs without a graph and keeps only the states x_k (one image
each; the noise is never stored); the backward pass walks the steps in reverse, recomputes each step's network call
and guidance with a graph (``create_graph=True`` inside the guidance), takes one VJP with respect to x_k and x_in,
and frees it. Without guidance this is one VJP through the network per step, with respect to x_k only (the
parameters get no gradient unless asked for with ``param_grads=True``, which passes them as inputs).

Chosen intermediate states can be outputs too (``expose``: DiffAttack's deviated-reconstruction loss reads them):
the forward pass returns ``(y, x_{k_1}, x_{k_2}, ...)``, and the backward pass adds each exposed state's incoming
gradient to ``g_k`` when the reverse walk reaches step k, so the memory stays the stored states plus one step's
graph.

``guidance_grad="detached"`` drops the guidance's part of ``J_{G_k}`` (the method's guidance then returns that part
as a constant): the gradient the released evaluations of guided methods computed. Optionally the graphs of the
last ``cache_steps`` steps are kept from the forward pass, so their recompute is skipped when memory allows.
"""

from __future__ import annotations

import torch

from ..chain import Chain, Noise, model_eps, start_state, step_terms
from ..models.base import ScoreModel, network_vjp

__all__ = ["ChainAdjoint", "GraphGuard", "carry_into", "history_cotangents"]


def history_cotangents(step, g_next: torch.Tensor):
    """What a step's history term ``a_prev x_{k-1} + b_prev eps(x_{k-1})`` passes back, given the cotangent
    g_next of its output x_{k+1}: (a_prev g_next, b_prev g_next), None for a factor that is zero; None for a step
    without history."""
    if not step.has_history:
        return None
    return (g_next * step.a_prev if step.a_prev != 0.0 else None,
            g_next * step.b_prev if step.b_prev != 0.0 else None)


def carry_into(carry, g_eps: torch.Tensor, g_x: torch.Tensor):
    """The cotangents of eps(x_k) and (directly) of x_k with the next step's history term's share added."""
    to_x, to_eps = carry
    return (g_eps if to_eps is None else g_eps + to_eps), (g_x if to_x is None else g_x + to_x)


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


def _graph_terms(model: ScoreModel, chain: Chain, k: int, step, xk: torch.Tensor, ref: torch.Tensor, noise: Noise,
                 with_guidance: bool):
    """eps(x_k) and, with_guidance, G_k (None where the step has none), with their graphs; xk: a leaf that
    requires grad."""
    with torch.enable_grad():
        if with_guidance:
            return step_terms(model, chain.guidance, k, step, xk, ref, noise, create_graph=True)
        return model_eps(model, xk, step), None


class ChainAdjoint(torch.autograd.Function):
    """y = chain(x_in) with the exact backward; x_in: (B, C, H, W) in [-1, 1], the start and the guidance reference.

    expose: sorted global step indices k whose state x_k (before step k) is returned after y, each a copy
    (B, C, H, W); () returns y alone. Guidance terms are differentiated as their ``term`` builds them: a guidance
    made with mode "detached" returns the guidance as a constant itself."""

    @staticmethod
    def forward(ctx, x_in, model: ScoreModel, chain: Chain, noise: Noise, cache_steps: int, guard, expose, *params):
        guided = chain.guidance is not None
        ref = x_in.detach()
        # One leaf for the input as the guidance reference, shared by the cached graphs and the recomputes.
        ref_leaf = x_in.detach().requires_grad_(guided)
        first_cached = max(len(chain) - cache_steps, 0)
        states, cached = [], {}
        y = ref
        for r, rnd in enumerate(chain.rounds):
            x = start_state(y, rnd, r, noise, ref)
            prev = None
            for j, step in enumerate(rnd.plan.steps):
                k = rnd.first_step + j
                states.append(x)
                if k < first_cached:
                    eps, g = step_terms(model, chain.guidance, k, step, x, ref, noise, create_graph=False)
                else:
                    # Keep this step's graph: x_k as a leaf, eps and G_k with their autograd history (G_k is
                    # built with its graph even when detached, since its value is needed anyway).
                    xk = x.detach().requires_grad_(True)
                    eps_graph, g_graph = _graph_terms(model, chain, k, step, xk, ref_leaf, noise, True)
                    cached[k] = (xk, eps_graph, g_graph)
                    eps, g = eps_graph.detach(), None if g_graph is None else g_graph.detach()
                x, prev = noise.step(x, eps, k, step, g, prev), (x, eps)
            y = x
        ctx.model, ctx.chain, ctx.noise, ctx.states, ctx.cached, ctx.guard = model, chain, noise, states, cached, guard
        ctx.ref, ctx.guided, ctx.params, ctx.expose = ref_leaf, guided, params, expose
        if not expose:
            return y
        return (y, *(states[k].clone() for k in expose))

    @staticmethod
    def backward(ctx, grad_out, *grad_states):
        ctx.guard.check("purify(grad_mode='full') backward")
        exposed = dict(zip(ctx.expose, grad_states))
        model, chain, noise, states, cached = ctx.model, ctx.chain, ctx.noise, ctx.states, ctx.cached
        ref, params, guided = ctx.ref, ctx.params, ctx.guided
        param_grads = [torch.zeros_like(p) for p in params]
        g_ref = torch.zeros_like(grad_out)
        g = grad_out
        for rnd in reversed(chain.rounds):
            carry = None  # what step k+1's history term owes to x_k and eps(x_k)
            for j in range(len(rnd.plan) - 1, -1, -1):
                k = rnd.first_step + j
                step = rnd.plan.steps[j]
                if k in cached:
                    # A kept graph serves one backward pass; a second one (retain_graph=True) recomputes the step.
                    xk, eps, gk = cached.pop(k)
                else:
                    xk = states[k].detach().requires_grad_(True)
                    eps, gk = _graph_terms(model, chain, k, step, xk, ref, noise, guided)
                if gk is not None and not gk.requires_grad:
                    gk = None  # a guidance with a zero derivative (e.g. a sign of the input): nothing flows back
                unguided = gk is None or not guided
                g_next = g
                if unguided and carry is None:
                    # J^T (b g) = b J^T g: the VJP of g itself (every chain without history terms takes this path)
                    vjp, *vjp_params = network_vjp(model, eps, (xk, *params), g, allow_unused=True)
                    g = g * step.a + vjp * step.b
                    vjp_params = [None if v is None else v * step.b for v in vjp_params]
                else:
                    g_eps, g_x = g * step.b, g * step.a
                    if carry is not None:
                        g_eps, g_x = carry_into(carry, g_eps, g_x)
                    if unguided:
                        vjp, *vjp_params = network_vjp(model, eps, (xk, *params), g_eps, allow_unused=True)
                    else:
                        vjp, vjp_ref, *vjp_params = network_vjp(model, (eps, gk), (xk, ref, *params), (g_eps, g),
                                                                allow_unused=True)
                        if vjp_ref is not None:
                            g_ref += vjp_ref
                    g = g_x + vjp
                if k in exposed:  # x_k is an output too: its own gradient joins d L / d x_k
                    g = g + exposed[k]
                carry = history_cotangents(step, g_next)
                for acc, vp in zip(param_grads, vjp_params):
                    if vp is not None:
                        acc.add_(vp)
                del xk, eps, gk, vjp, vjp_params
            # Into the round's start x_0 = s y + n z (nothing flows back from a round that starts from noise).
            g = torch.zeros_like(g) if rnd.from_noise else g * rnd.start_scale
        return (g + g_ref, None, None, None, None, None, None, *param_grads)
