"""The step interface every solver shares.

A purification's reverse process is a sequence of steps, each linear in the state, the network's epsilon and a
noise draw:

    x_{k+1} = a_k x_k + b_k eps(x_k, t_k) + c_k z_k

A solver turns (schedule, t*, step size) into that sequence of coefficients, a ``Plan``; one integration loop
(``diffpure_fast.engine``) and one exact adjoint (``diffpure_fast.grad``) serve every solver. Guidance terms (later)
add to ``eps`` inside the step and keep this shape.
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
    """

    t: float
    level: int | None
    a: float
    b: float
    c_unit: float
    c_increment: float


@dataclass(frozen=True)
class Plan:
    solver: str
    steps: tuple[Step, ...]
    # What a caller's increment at each step means (for error messages and docs); None: the plan takes no noise.
    increment_meaning: str | None

    def __len__(self) -> int:
        return len(self.steps)


class Solver:
    """A solver: a name, an order, and ``plan`` building the step coefficients."""

    name: str = ""
    strong_order: float = 0.0

    def plan(self, schedule: VPSchedule, t_star: float, *, dt: float | None, steps: int | None,
             dtype=np.float32) -> Plan:
        """dtype: the numpy float type the time grid is computed in (torchsde's: the state's dtype)."""
        raise NotImplementedError


def torch_dtype_of(dtype) -> torch.dtype:
    """The torch dtype of a numpy float type (the solvers' ``dtype`` argument)."""
    return torch.float64 if np.dtype(dtype) == np.float64 else torch.float32


def sigma_in(schedule: VPSchedule, t: float, dtype) -> float:
    """``sigma(t) = sqrt(1 - alpha_bar(t))`` computed as a tensor of the numpy float type ``dtype`` computes it (the
    official code's value, rounding included)."""
    return float(schedule.sigma(torch.tensor(t, dtype=torch_dtype_of(dtype))))
