"""Time grids of the few-step solvers, and the VP quantities their updates are written in.

For the continuous VP schedule (``schedule.VPSchedule``): ``alpha_t = sqrt(alpha_bar(t))``, ``sigma_t =
sqrt(1 - alpha_bar(t))`` and the half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` (Lu et al. 2022, DPM-Solver,
section 3.1), decreasing in t, with the closed-form inverse of the linear schedule: from ``log alpha = -log(1 +
exp(-2 lambda)) / 2`` and ``log alpha = -(b1 - b0) t^2 / 4 - b0 t / 2``,

    t(lambda) = (sqrt(b0^2 - 4 (b1 - b0) log alpha) - b0) / (b1 - b0).

A grid runs from ``t_start`` (DiffPure's t*) down to ``t_end`` (DiffPure's 1e-5) in ``n`` intervals, as the
official DPM-Solver code's ``get_time_steps`` spaces them (``dpm_solver_pytorch.py``, LuChengTHU/dpm-solver):

* ``"uniform"``: equal steps in t (``time_uniform``; DiffPure's Euler grid is this one);
* ``"logSNR"``: equal steps in lambda (DPM-Solver's recommendation for low-resolution pixel models);
* ``"quadratic"``: equal steps in sqrt(t) (``time_quadratic``, DDIM's quadratic spacing for CIFAR-10), denser
  near t_end.

All in float64; ``step_times`` then rounds each time to the state's float type, the value the network sees, and
the solvers compute their coefficients from those rounded times.
"""

from __future__ import annotations

import math

import numpy as np

from .._validate import OptionError
from ..schedule import VPSchedule
from .euler import T_END

__all__ = ["TIME_GRIDS", "alpha_sigma", "check_steps", "half_log_snr", "step_times", "time_grid",
           "time_of_half_log_snr"]

TIME_GRIDS = ("uniform", "logSNR", "quadratic")


def check_steps(solver: str, t_star: float, dt, steps, time_grid: str, *, calls: int = 1,
                grids: tuple[str, ...] = TIME_GRIDS) -> int:
    """The number of grid intervals of a few-step solver ``solver`` making ``calls`` network calls per interval,
    after the errors of its options, each naming the option: a step size given (these solvers take a count), no
    step count, one that is not a multiple of ``calls`` (``steps`` counts network calls), a grid not in ``grids``,
    and on a continuous grid a t* not above the end 1e-5."""
    if dt is not None:
        raise OptionError("dt", lambda s: f"{s.setting('solver', solver)} takes a step count {s.name('steps')} "
                                          f"(network calls), not a step size")
    if steps is None:
        raise OptionError("steps", lambda s: f"{s.setting('solver', solver)} needs a step count (network calls), "
                                             f"e.g. {s.setting('steps', 10 * calls)}")
    if steps % calls:
        raise OptionError("steps", lambda s: f"{s.setting('solver', solver)} makes {calls} network calls per step "
                                             f"of its grid, and {s.name('steps')} counts network calls: expected a "
                                             f"multiple of {calls}, got {steps}")
    if time_grid not in grids:
        raise OptionError("time_grid", lambda s: f"{s.setting('solver', solver)} takes one of {grids}, got "
                                                 f"{time_grid!r}")
    if time_grid in TIME_GRIDS and not t_star > T_END:
        raise OptionError("t_star", lambda s: f"{s.setting('solver', solver)} on the {time_grid!r} grid runs from "
                                              f"t* down to {T_END}; expected a value > {T_END}, got {t_star}")
    return steps // calls


def alpha_sigma(schedule: VPSchedule, t: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar(t)), sqrt(1 - alpha_bar(t))), float64 (expm1: no cancellation near 0)."""
    log_ab = schedule.log_alpha_bar(t)
    return math.exp(0.5 * log_ab), math.sqrt(-math.expm1(log_ab))


def half_log_snr(schedule: VPSchedule, t: float) -> float:
    """lambda_t = log(alpha_t) - log(sigma_t)."""
    log_ab = schedule.log_alpha_bar(t)
    return 0.5 * log_ab - 0.5 * math.log(-math.expm1(log_ab))


def time_of_half_log_snr(schedule: VPSchedule, lam: float) -> float:
    """The t with ``half_log_snr(t) = lam`` (module docstring); float64."""
    b0, b1 = schedule.beta_min, schedule.beta_max
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
    return float((math.sqrt(b0 * b0 - 4.0 * (b1 - b0) * log_alpha) - b0) / (b1 - b0))


def time_grid(schedule: VPSchedule, t_start: float, t_end: float, n: int, kind: str) -> np.ndarray:
    """n + 1 decreasing times from t_start to t_end (both included), spaced as ``kind`` says; float64."""
    if kind == "uniform":
        return np.linspace(t_start, t_end, n + 1)
    if kind == "quadratic":
        return np.linspace(math.sqrt(t_start), math.sqrt(t_end), n + 1) ** 2
    if kind == "logSNR":
        lams = np.linspace(half_log_snr(schedule, t_start), half_log_snr(schedule, t_end), n + 1)
        ts = np.array([time_of_half_log_snr(schedule, lam) for lam in lams])
        ts[0], ts[-1] = t_start, t_end   # the inverse is exact to rounding; the ends are the ends
        return ts
    raise OptionError("time_grid", f"expected one of {TIME_GRIDS}, got {kind!r}")


def step_times(schedule: VPSchedule, t_start: float, t_end: float, n: int, kind: str, dtype) -> list[float]:
    """``time_grid`` rounded to the numpy float type ``dtype`` (the network's time input), as Python floats."""
    return [float(dtype(t)) for t in time_grid(schedule, t_start, t_end, n, kind)]
