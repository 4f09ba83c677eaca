"""Reverse-process solvers behind one step interface (``base.Plan``), registered by name."""

from .._validate import OptionError
from .base import Plan, Solver, Step
from .ddpm import AncestralDDPM
from .euler import EulerMaruyama, reverse_time_grid

SOLVERS: dict[str, Solver] = {s.name: s for s in (EulerMaruyama(), AncestralDDPM())}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise OptionError("solver", f"expected one of {tuple(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


__all__ = ["SOLVERS", "AncestralDDPM", "EulerMaruyama", "Plan", "Solver", "Step", "get_solver", "reverse_time_grid"]
