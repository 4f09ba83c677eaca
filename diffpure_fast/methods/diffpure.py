"""DiffPure (Nie et al., ICML 2022): diffuse the input once to t*, then solve the reverse VP-SDE back, unguided.

Options: ``t_star`` (0.1, DiffPure's CIFAR-10 setting), ``dt`` (Euler only; 1e-3 when neither dt nor steps is
given: 100 Euler–Maruyama steps on torchsde's float32 grid at t* = 0.1), ``steps`` (instead of dt: equal Euler
steps, or respaced DDPM levels), ``solver`` (``"euler"``: DiffPure's reverse SDE; ``"ddpm"``: ancestral steps on the
discrete schedule). Giving both dt and steps, or dt with ``solver="ddpm"``, is an error: neither is ever ignored.
The diffusion level is DiffPure's ``round(N t*)``, rounded once and recorded (``PurifyConfig.resolved``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._validate import OptionError, check_choice, check_float, check_int
from ..chain import Chain
from ..schedule import VPSchedule
from ..solvers import SOLVERS, Plan, get_solver
from ..solvers.euler import T_END
from .base import Method, MethodOptions, diffuse_round

__all__ = ["DEFAULT_DT", "DiffPure", "DiffPureOptions"]

# DiffPure's Euler–Maruyama step size (100 steps at t* = 0.1 on torchsde's float32 grid).
DEFAULT_DT = 1e-3


@dataclass(frozen=True)
class DiffPureOptions(MethodOptions):
    t_star: float = 0.1
    dt: float | None = None    # None: DEFAULT_DT for solver="euler" without steps, else none (stored as used)
    steps: int | None = None
    solver: str = "euler"

    def __post_init__(self):
        self._set("t_star", check_float("t_star", self.t_star, low=0.0, high=1.0, low_open=True))
        check_choice("solver", self.solver, tuple(SOLVERS))
        if self.solver == "euler" and self.t_star <= T_END:
            raise OptionError("t_star", f"the reverse SDE runs from t* down to {T_END}; expected a value > {T_END}, "
                                        f"got {self.t_star}")
        if self.steps is not None:
            self._set("steps", check_int("steps", self.steps))
        if self.dt is not None:
            self._set("dt", check_float("dt", self.dt, low=0.0, low_open=True))
            # A dt that would not be used is an error, never ignored.
            if self.solver != "euler":
                raise OptionError("dt", lambda s: f"{s.setting('solver', self.solver)} walks discrete levels and "
                                                  f"takes no step size; give {s.name('steps')} (default: one step "
                                                  f"per level)")
            if self.steps is not None:
                raise OptionError("dt", lambda s: f"give a step size {s.name('dt')} or a step count "
                                                  f"{s.name('steps')}, not both")
        elif self.solver == "euler" and self.steps is None:
            self._set("dt", DEFAULT_DT)


class DiffPure(Method):
    name = "diffpure"
    Options = DiffPureOptions
    has_continuous_adjoint = True

    def plan(self, opts: DiffPureOptions, schedule: VPSchedule, dtype: torch.dtype = torch.float32) -> Plan:
        """The step coefficients for states of ``dtype`` (the Euler grid is accumulated in it, as torchsde does):
        ``steps`` equal steps, or the grid of step size ``dt``."""
        if schedule.level_of(opts.t_star) < 1:
            raise OptionError("t_star", f"expected round({schedule.num_levels} t*) >= 1 (DiffPure's diffusion level), "
                                        f"got {opts.t_star}")
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return get_solver(opts.solver).plan(schedule, opts.t_star, dt=opts.dt, steps=opts.steps, dtype=np_dtype)

    def chain(self, opts: DiffPureOptions, schedule: VPSchedule, dtype: torch.dtype, guidance_grad: str) -> Chain:
        # DiffPure's forward diffusion uses the discrete alpha_bar at level round(N t*) - 1.
        return Chain((diffuse_round(self.plan(opts, schedule, dtype), schedule, schedule.level_of(opts.t_star) - 1),))

    def surrogate_t_star(self, opts: DiffPureOptions, schedule: VPSchedule) -> float:
        return opts.t_star

    def surrogate_origin(self, opts: DiffPureOptions):
        return "t_star", opts.t_star

    def start_level(self, opts: DiffPureOptions, schedule: VPSchedule) -> int:
        return schedule.level_of(opts.t_star)
