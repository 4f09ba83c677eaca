"""Reverse-process solvers behind one step interface (``base.Plan``), registered by name.

``euler`` (DiffPure's Euler–Maruyama) and ``ddpm`` (ancestral, respaced) are one network call per step; the
few-step solvers ``ddim``, ``dpm-solver`` (orders 1 and 2), ``dpm-solver++`` (2M) and ``heun`` run on the time
grids of ``grids`` and count ``steps`` in network calls.
"""

from .._validate import OptionError
from .base import Plan, Solver, Step
from .ddim import DDIM
from .ddpm import AncestralDDPM
from .dpm_solver import DPMSolver
from .dpm_solver_pp import DPMSolverPP
from .euler import EulerMaruyama, reverse_time_grid
from .grids import TIME_GRIDS
from .heun import Heun

SOLVERS: dict[str, Solver] = {s.name: s for s in (EulerMaruyama(), AncestralDDPM(), DDIM(), DPMSolver(),
                                                   DPMSolverPP(), Heun())}
# Every option some solver takes beyond dt and steps (each solver's own: Solver.options).
SOLVER_OPTIONS = tuple(dict.fromkeys(k for s in SOLVERS.values() for k in s.options))


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise OptionError("solver", f"expected one of {tuple(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


__all__ = ["DDIM", "SOLVERS", "SOLVER_OPTIONS", "TIME_GRIDS", "AncestralDDPM", "DPMSolver", "DPMSolverPP",
           "EulerMaruyama", "Heun", "Plan", "Solver", "Step", "get_solver", "reverse_time_grid"]
