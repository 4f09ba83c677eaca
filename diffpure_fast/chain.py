"""The reverse chain every purification method runs: start states, step plans, noise, and per-step guidance.

A method (``diffpure_fast.methods``) describes its purification as a :class:`Chain` of rounds. Round ``r`` starts
from the previous round's output ``y_{r-1}`` (``y_{-1}`` is the input ``x_in`` in [-1, 1]):

    x_0 = s_r y_{r-1} + n_r z_r              (forward diffusion; s_r = 0, n_r = 1: start from pure noise)
    x_{k+1} = a_k x_k + b_k eps(x_k, t_k) + c_k z_k + G_k(x_k, eps(x_k), x_in)

and its last state is ``y_r``. ``G_k`` is the method's guidance term (zero where a step has none); it may itself be
a gradient (of a distance between the predicted clean image and ``x_in``), computed with autograd inside the step.
The same functions run the forward pass here and the recompute of the exact adjoint (``diffpure_fast.grad``), so
what is differentiated is what ran.

Noise is counter-based (``diffpure_fast.noise``): round r's start noise is (seed, id, step=r, STREAM_FORWARD), the
solver noise of global step k is (seed, id, step=k, STREAM_REVERSE), and a guidance term that needs fresh noise
(GDMP's noised reference) draws (seed, id, step=k, STREAM_GUIDANCE). A sample's result never depends on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops
from .models.base import ScoreModel
from .noise import STREAM_FORWARD, sample_noise
from .schedule import VPSchedule
from .solvers.base import Plan, Step

__all__ = ["Chain", "Guidance", "Noise", "Round", "forward_diffuse", "model_eps", "reverse_solve", "run_chain",
           "solve_round", "start_state", "step_terms"]


class Noise:
    """Where each step's noise comes from: caller-given tensors, or the counter generator.

    seed, sample_ids: the counter generator's key and per-sample ids ((B,) int64).
    increments: (steps, B, C, H, W) solver noise used exactly when given (one-round chains only).
    forward: (B, C, H, W) the start noise of round 0, used exactly when given.
    """

    def __init__(self, *, seed: int | None = None, sample_ids: torch.Tensor | None = None,
                 increments: torch.Tensor | None = None, forward: torch.Tensor | None = None):
        self.seed = seed
        self.sample_ids = sample_ids
        self.increments = increments
        self.forward = forward

    def draw(self, step: int, stream: int, like: torch.Tensor) -> torch.Tensor:
        """Counter noise shaped like ``like`` for (step, stream)."""
        return sample_noise(self.seed, self.sample_ids, step, stream, like)

    def start(self, r: int, like: torch.Tensor) -> torch.Tensor:
        """The start noise z_r of round r."""
        if r == 0 and self.forward is not None:
            return self.forward
        return self.draw(r, STREAM_FORWARD, like)

    def step(self, x: torch.Tensor, eps: torch.Tensor, k: int, step: Step,
             guide: torch.Tensor | None = None) -> torch.Tensor:
        """x_{k+1} = a x + b eps + c z_k (+ guide) through the fused op."""
        if self.increments is not None:
            return ops.sde_step(x, eps, step.a, step.b, step.c_increment, z=self.increments[k], guide=guide)
        return ops.sde_step(x, eps, step.a, step.b, step.c_unit, seed=self.seed, sample_ids=self.sample_ids, step=k,
                            guide=guide)


class Guidance:
    """A per-step additive term ``G_k(x_k, eps_k, x_in)`` of a guided chain.

    Subclasses set the two flags and implement ``active`` and ``term``.

    needs_autograd: ``term`` differentiates something with respect to ``x`` (then ``x`` arrives requiring grad).
    needs_eps_graph: ``term`` uses ``eps`` as a function of ``x`` (the network's graph), not only its value.
    """

    needs_autograd: bool = False
    needs_eps_graph: bool = False

    def active(self, k: int) -> bool:
        """Whether global step k has a guidance term."""
        raise NotImplementedError

    def term(self, k: int, step: Step, x: torch.Tensor, eps: torch.Tensor, ref: torch.Tensor, noise: Noise, *,
             create_graph: bool) -> torch.Tensor:
        """G_k, (B, C, H, W). x: the state x_k; eps: eps(x_k); ref: the input x_in in [-1, 1].

        create_graph: keep the graph of any inner gradient, so that G_k can itself be differentiated (the exact
        adjoint's recompute); False in the forward pass."""
        raise NotImplementedError


@dataclass(frozen=True)
class Round:
    """One diffuse-then-denoise pass: start ``x_0 = start_scale y + noise_scale z``, then the steps of ``plan``.

    first_step: the global index of the plan's first step (the counter of its solver and guidance noise).
    """

    plan: Plan
    start_scale: float
    noise_scale: float
    first_step: int = 0

    @property
    def from_noise(self) -> bool:
        return self.start_scale == 0.0


@dataclass(frozen=True)
class Chain:
    """A method's whole purification: rounds run in order, an optional guidance shared by all of them."""

    rounds: tuple[Round, ...]
    guidance: Guidance | None = None

    def __len__(self) -> int:
        return sum(len(r.plan) for r in self.rounds)

    def steps(self):
        """(round index, global step index k, Step) for every step, in order."""
        for r, rnd in enumerate(self.rounds):
            for j, step in enumerate(rnd.plan.steps):
                yield r, rnd.first_step + j, step


def model_eps(model: ScoreModel, x: torch.Tensor, step: Step) -> torch.Tensor:
    """The network's epsilon at one step: (B, C, H, W)."""
    b = x.shape[0]
    t = torch.full((b,), step.t, dtype=x.dtype, device=x.device)
    levels = None if step.level is None else torch.full((b,), step.level, dtype=torch.int64, device=x.device)
    return model.eps(x, t, levels)


def start_state(y: torch.Tensor, rnd: Round, r: int, noise: Noise, like: torch.Tensor) -> torch.Tensor:
    """Round r's start ``start_scale y + noise_scale z_r``: pure noise when start_scale is 0, y itself (no noise
    drawn) when noise_scale is 0."""
    if rnd.noise_scale == 0.0:
        return y if rnd.start_scale == 1.0 else y * rnd.start_scale
    z = noise.start(r, like)
    if rnd.from_noise:
        return z if rnd.noise_scale == 1.0 else z * rnd.noise_scale
    return y * rnd.start_scale + z * rnd.noise_scale


def forward_diffuse(x: torch.Tensor, z: torch.Tensor, t_star: float, schedule: VPSchedule) -> torch.Tensor:
    """DiffPure's one-shot forward diffusion with the *discrete* alpha_bar at level round(N t*):
    ``sqrt(abar[L-1]) x + sqrt(1 - abar[L-1]) z``; x, z: (B, C, H, W), x in [-1, 1]."""
    ab = schedule.discrete_alpha_bar()[schedule.level_of(t_star) - 1].item()
    return x * math.sqrt(ab) + z * math.sqrt(1.0 - ab)


def step_terms(model: ScoreModel, guidance: Guidance | None, k: int, step: Step, x: torch.Tensor,
               ref: torch.Tensor, noise: Noise, *, create_graph: bool):
    """(eps(x_k), G_k or None) for one step.

    create_graph=False (forward pass): the result carries no graph; a local graph is built only where the guidance
    differentiates with respect to x_k. create_graph=True (the adjoint's recompute, grad enabled, x a leaf that
    requires grad): eps and G_k keep their graphs, second-order terms included."""
    active = guidance is not None and guidance.active(k)
    if create_graph:
        eps = model_eps(model, x, step)
        return eps, (guidance.term(k, step, x, eps, ref, noise, create_graph=True) if active else None)
    if not active:
        return model_eps(model, x, step), None
    if not guidance.needs_autograd:
        eps = model_eps(model, x, step)
        return eps, guidance.term(k, step, x, eps, ref, noise, create_graph=False)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        if guidance.needs_eps_graph:
            eps = model_eps(model, xg, step)
        else:
            with torch.no_grad():
                eps = model_eps(model, x, step)
        g = guidance.term(k, step, xg, eps, ref.detach(), noise, create_graph=False)
    return eps.detach(), g.detach()


def solve_round(x: torch.Tensor, model: ScoreModel, rnd: Round, noise: Noise, *, guidance: Guidance | None = None,
                ref: torch.Tensor | None = None, states: list | None = None) -> torch.Tensor:
    """The steps of one round from its start state x (B, C, H, W); appends x_k to ``states`` when given."""
    for j, step in enumerate(rnd.plan.steps):
        k = rnd.first_step + j
        if states is not None:
            states.append(x)
        eps, g = step_terms(model, guidance, k, step, x, ref, noise, create_graph=False)
        x = noise.step(x, eps, k, step, g)
    return x


def run_chain(x_in: torch.Tensor, model: ScoreModel, chain: Chain, noise: Noise, *,
              keep_states: bool = False):
    """Run ``chain`` from the input x_in (B, C, H, W) in [-1, 1].

    Returns y (the last round's output), or (y, states) with keep_states: ``states[k]`` is the state x_k before
    global step k (one image each; the noise is never stored)."""
    states = [] if keep_states else None
    y = x_in
    for r, rnd in enumerate(chain.rounds):
        y = solve_round(start_state(y, rnd, r, noise, x_in), model, rnd, noise, guidance=chain.guidance,
                        ref=x_in, states=states)
    return (y, states) if keep_states else y


def reverse_solve(x: torch.Tensor, model: ScoreModel, plan: Plan, noise: Noise, *, keep_states: bool = False):
    """Run every step of an unguided ``plan`` from x (B, C, H, W). Returns x_n, or (x_n, [x_0 .. x_{n-1}])."""
    states = [] if keep_states else None
    x = solve_round(x, model, Round(plan, 1.0, 0.0), noise, states=states)
    return (x, states) if keep_states else x
