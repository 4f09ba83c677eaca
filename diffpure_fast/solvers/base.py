"""The step interface every solver shares.

A purification's reverse process is a sequence of steps, each linear in the state, the network's epsilon and a
noise draw:

    x_{k+1} = a_k x_k + b_k eps(x_k, t_k) + c_k z_k  [+ p_k x_{k-1} + q_k eps(x_{k-1}, t_{k-1})]

A solver turns (schedule, t*, step size) into that sequence of coefficients, a ``Plan``; one integration loop
(``diffpure_fast.chain``) and one exact adjoint (``diffpure_fast.grad``) serve every solver. Guidance terms add to
the step (the chain's per-step term) and keep this shape.

The bracket is the history term of multistep and two-stage solvers (``p_k = a_prev``, ``q_k = b_prev``; zero for
one-step solvers): DPM-Solver++(2M)'s previous data prediction, the second stage of DPM-Solver-2 and of Heun's
method, which restart from the state before their first stage. Each step is still one network call. Why a Plan
extension and not a per-step guidance term (as the LD-SDE's pull toward x_in): the history is linear in what the
chain already holds (the previous state and network output), so the adjoint carries it exactly with two scalars per
step and no second network call or graph (``g_{k-1} += p_k g_{k+1}``, and ``q_k g_{k+1}`` joins the cotangent of
eps_{k-1} before its one VJP), whereas a guidance term would have to recompute and differentiate
``eps(x_{k-1})`` inside step k, doubling the network calls of the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..schedule import VPSchedule

__all__ = ["Plan", "Solver", "Step", "sigma_in", "torch_dtype_of"]


@dataclass(frozen=True)
class Step:
    """Coefficients of one step.

    t: the network's continuous time for this step (a float32-representable value, as the official code computes).
    level: the discrete DDPM level the step denoises from (ancestral solvers), or None.
    a, b: multipliers of x_k and eps(x_k, t_k).
    c_unit: multiplier of a standard normal draw (the engine's own noise).
    c_increment: multiplier of a caller-given increment (Euler–Maruyama: a Brownian increment dW, so g(t);
        ancestral DDPM: a standard normal, so the same as c_unit).
    a_prev, b_prev: multipliers of the previous step's state x_{k-1} and network output eps(x_{k-1}) (the history
        term; 0 for one-step solvers, and always 0 on a plan's first step).
    """

    t: float
    level: int | None
    a: float
    b: float
    c_unit: float
    c_increment: float
    a_prev: float = 0.0
    b_prev: float = 0.0

    @property
    def has_history(self) -> bool:
        return self.a_prev != 0.0 or self.b_prev != 0.0


@dataclass(frozen=True)
class Plan:
    solver: str
    steps: tuple[Step, ...]
    # What a caller's increment at each step means (for error messages and docs); None: the plan takes no noise.
    increment_meaning: str | None

    def __post_init__(self):
        if self.steps and self.steps[0].has_history:
            raise ValueError(f"plan {self.solver!r}: its first step has a history term, but there is no step before it")

    def __len__(self) -> int:
        return len(self.steps)


class Solver:
    """A solver: a name, an order, its own options, and ``plan`` building the step coefficients.

    options: the solver's own options beyond ``dt`` and ``steps`` with their defaults (``eta``, ``order``,
    ``time_grid``); ``plan`` receives each of them as a keyword. An option of another solver is an error of the
    method's options, naming it.
    calls_per_step: network calls per step of the solver's own method (2 for DPM-Solver-2 and Heun's method, whose
    ``steps`` count network calls and must be a multiple of it)."""

    name: str = ""
    strong_order: float = 0.0
    options: dict = {}
    calls_per_step: int = 1

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32, **options) -> Plan:
        """dtype: the numpy float type the time grid is computed in (torchsde's: the state's dtype)."""
        raise NotImplementedError


def torch_dtype_of(dtype) -> torch.dtype:
    """The torch dtype of a numpy float type (the solvers' ``dtype`` argument)."""
    return torch.float64 if np.dtype(dtype) == np.float64 else torch.float32


def sigma_in(schedule: VPSchedule, t: float, dtype) -> float:
    """``sigma(t) = sqrt(1 - alpha_bar(t))`` computed as a tensor of the numpy float type ``dtype`` computes it (the
    official code's value, rounding included)."""
    return float(schedule.sigma(torch.tensor(t, dtype=torch_dtype_of(dtype))))
