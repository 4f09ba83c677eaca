"""DiffPure (Nie et al., ICML 2022): diffuse the input once to t*, then solve the reverse VP-SDE back, unguided.

Options: ``t_star`` (0.1, DiffPure's CIFAR-10 setting), ``dt`` (1e-3: 100 Euler–Maruyama steps on torchsde's
float32 grid at t* = 0.1), ``steps`` (instead of dt: equal Euler steps, or respaced DDPM levels), ``solver``
(``"euler"``: DiffPure's reverse SDE; ``"ddpm"``: ancestral steps on the discrete schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..chain import Chain
from ..schedule import VPSchedule
from ..solvers import Plan, get_solver
from ..solvers.euler import T_END
from .base import Method, MethodOptions, check_float, check_int, diffuse_round

__all__ = ["DiffPure", "DiffPureOptions"]


@dataclass(frozen=True)
class DiffPureOptions(MethodOptions):
    t_star: float = 0.1
    dt: float | None = 1e-3
    steps: int | None = None
    solver: str = "euler"

    def __post_init__(self):
        check_float("t_star", self.t_star, low=0.0, high=1.0, low_open=True)
        if self.solver == "euler" and self.t_star <= T_END:
            raise ValueError(f"t_star: the reverse SDE runs from t* down to {T_END}; expected t_star > {T_END}")
        if self.dt is not None:
            check_float("dt", self.dt, low=0.0, low_open=True)
        if self.steps is not None:
            check_int("steps", self.steps)
        get_solver(self.solver)
        if self.solver == "euler" and self.dt is None and self.steps is None:
            raise ValueError("dt, steps: solver='euler' needs a step size dt or a step count steps, got neither")


class DiffPure(Method):
    name = "diffpure"
    Options = DiffPureOptions
    has_continuous_adjoint = True

    def plan(self, opts: DiffPureOptions, schedule: VPSchedule, dtype: torch.dtype = torch.float32) -> Plan:
        """The step coefficients for states of ``dtype`` (the Euler grid is accumulated in it, as torchsde does);
        a step count overrides the default dt."""
        if schedule.level_of(opts.t_star) < 1:
            raise ValueError(f"t_star: expected round({schedule.num_levels} t_star) >= 1 (DiffPure's diffusion "
                             f"level), got t_star={opts.t_star}")
        dt = opts.dt if (opts.solver == "euler" and opts.steps is None) else None
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return get_solver(opts.solver).plan(schedule, opts.t_star, dt=dt, steps=opts.steps, dtype=np_dtype)

    def chain(self, opts: DiffPureOptions, schedule: VPSchedule, dtype: torch.dtype, guidance_grad: str) -> Chain:
        # DiffPure's forward diffusion uses the discrete alpha_bar at level round(N t*) - 1.
        return Chain((diffuse_round(self.plan(opts, schedule, dtype), schedule, schedule.level_of(opts.t_star) - 1),))

    def surrogate_t_star(self, opts: DiffPureOptions, schedule: VPSchedule) -> float:
        return opts.t_star
