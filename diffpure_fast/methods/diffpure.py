"""DiffPure (Nie et al., ICML 2022) with its five official runners, chosen by ``diffusion_type`` as the official
``eval_sde_adv.py --diffusion_type`` chooses them (NVlabs/DiffPure ``runners/``):

==================  ============================  =========================================================
``diffusion_type``  official runner               what it computes
==================  ============================  =========================================================
``"sde"``           ``diffpure_sde.py``           diffuse once to t*, reverse VP-SDE by Euler–Maruyama (torchsde)
``"ode"``           ``diffpure_ode.py``           diffuse once to t*, probability-flow ODE by Euler (torchdiffeq)
``"ldsde"``         ``diffpure_ldsde.py``         no diffusion: Langevin dynamics at t = 0.01 pulled toward x_in
``"ddpm"``          ``diffpure_guided.py``        diffuse to level L, guided-diffusion's ``p_sample`` at L-1 .. 0
``"celebahq-ddpm"`` ``diffpure_ddpm.py``          diffuse to level L, SDEdit's ancestral step at L-1 .. 0
==================  ============================  =========================================================

Options (defaults are the official ones; ``t_star`` is ``--t / 1000``):

* ``sde`` (:class:`DiffPureOptions`): ``t_star`` 0.1, ``dt`` (Euler only; 1e-3 when neither dt nor steps is
  given: torchsde's float32 grid), ``steps`` (ours: equal Euler steps, or respaced levels), ``solver`` ("euler", or
  "ddpm": ours, posterior variance, no clipping). Giving both dt and steps, or dt with ``solver="ddpm"``, is an
  error: neither is ever ignored. Its diffusion level is DiffPure's ``round(N t*)``, rounded once and recorded
  (``PurifyConfig.resolved``);
* ``ode`` (:class:`ODEOptions`): ``t_star`` 0.1, ``step_size`` 1e-3 (the official ``--step_size``; torchdiffeq's
  grid, ``solvers.ode``);
* ``ldsde`` (:class:`LDSDEOptions`): ``t_star`` 0.1 (the span ``[1 - t*, 1 - 1e-5]`` of torchsde's time, not a
  noise level), ``dt`` 1e-2 (fixed in the official code; an option here), ``sigma2`` 1e-3, ``lambda_ld`` 1e-2,
  ``eta`` 5 (``solvers.langevin``);
* ``ddpm`` (:class:`GuidedDDPMOptions`): ``t_star`` 0.1. Needs a network with learned variance (guided-diffusion's
  ``learn_sigma``): the step's std is ``exp(logvar / 2)``, its log variance interpolating between the clipped
  posterior variance and beta by the network's variance channels; x0 is predicted from eps and clipped to [-1, 1],
  the mean is the posterior mean of the clipped x0, noise on all but the last step. This is not ``solver="ddpm"``;
* ``celebahq-ddpm`` (:class:`CelebAHQOptions`): ``t_star`` 0.5 (the official CelebA-HQ run scripts' ``--t 500``),
  ``var_type`` "fixedsmall" (celeba.yml) or "fixedlarge"; the mean ``(x - beta / sqrt(1 - alpha_bar) eps) /
  sqrt(1 - beta)`` (``solvers.ddpm.epsilon_mean_plan``). Written for SDEdit's DDPM UNet
  (``load_score_model("celebahq_ddpm", ...)``), and runs any epsilon network.

The default ``t_star`` of ``sde``, ``ode``, ``ldsde`` and ``ddpm`` is ours (0.1, DiffPure's CIFAR-10 setting; the
official argparse default ``--t 400`` is overridden by every official run script). ``ode``, ``ddpm`` and
``celebahq-ddpm`` diffuse to the integer level ``N t*`` (the official ``--t``), so their ``t_star`` must be a
multiple of ``1 / N``: anything else is an error, not a rounding.

Design (ours): the diffusion type is an option of ``method="diffpure"``, and each runner has its own options
dataclass (each with the field ``diffusion_type``, so descriptions and evaluation records name the runner): an
option a runner does not have is an error naming it, as for methods. Every runner is one chain
(``diffpure_fast.chain``), so the engine, the exact adjoint (``grad_mode="full"``), ``"bpda"`` and
``"surrogate"`` serve all five; what a step holds beyond the fused ``a x + b eps + c z`` is the chain's per-step term:
the LD-SDE's pull ``w_k x_in`` (the exact gradient carries that path, which the official torchsde adjoint drops:
``x_in`` is not one of its adjoint parameters), guided-diffusion's clipped x0 (derivative zero where the clip is
active) and its noise scaled by the learned std (differentiated through the network's variance channels).
``grad_mode="adjoint"``: the official gradients of ``sde`` (torchsde's adjoint) and ``ode`` (torchdiffeq's
``odeint_adjoint``); the ``ddpm`` and ``celebahq-ddpm`` runners compute no gradient (they run under
``torch.no_grad``), and ``ldsde``'s official gradient misses the x_in path, so they have none here.
``grad_mode="surrogate"`` starts its DDPM chain at t* for every runner (for ``ldsde``, whose chain has no noise
level, t* is the span of its time grid: our choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import OptionError, OptionTypeError, check_choice, check_float, check_int
from ..chain import Chain, Guidance, Noise, Round
from ..schedule import VPSchedule
from ..solvers import SOLVER_OPTIONS, SOLVERS, Plan, get_solver
from ..solvers.base import Step
from ..solvers.ddpm import (
    VAR_TYPES,
    DDPMLevel,
    clipped_x0_correction,
    ddpm_levels,
    epsilon_mean_plan,
    posterior_mean_steps,
)
from ..solvers.dpm_solver import DPM_SOLVER_ORDERS
from ..solvers.euler import T_END
from ..solvers.langevin import langevin_plan
from ..solvers.ode import ode_euler_plan
from .base import Method, MethodOptions, diffuse_round, make_options

__all__ = ["DEFAULT_DT", "DIFFUSION_TYPES", "CelebAHQOptions", "DiffPure", "DiffPureOptions", "GuidedDDPMOptions",
           "GuidedDiffusionTerm", "LDSDEOptions", "LangevinAnchor", "ODEOptions", "RunnerOptions"]

DIFFUSION_TYPES = ("sde", "ode", "ldsde", "ddpm", "celebahq-ddpm")
# DiffPure's Euler–Maruyama step size (100 steps at t* = 0.1 on torchsde's float32 grid).
DEFAULT_DT = 1e-3


@dataclass(frozen=True)
class RunnerOptions(MethodOptions):
    """Base of the five runners' options (``isinstance`` checks); each runner's class lists its own fields, with
    ``diffusion_type`` last, fixed to that runner."""

    def _check_type(self, expected: str) -> None:
        if getattr(self, "diffusion_type", None) != expected:
            raise OptionError("diffusion_type", f"{type(self).__name__} holds the options of diffusion_type="
                                                f"{expected!r}, got {getattr(self, 'diffusion_type', None)!r} (pass "
                                                f"diffusion_type to purify/Purifier, which picks the options class)")


def _check_t_star(v, kind: str) -> float:
    v = check_float("t_star", v, low=0.0, high=1.0, low_open=True)
    if v <= T_END:
        raise OptionError("t_star", lambda s: f"{s.setting('diffusion_type', kind)} runs from t* down to t = {T_END}; "
                                              f"expected a value > {T_END}, got {v!r}")
    return v


@dataclass(frozen=True)
class DiffPureOptions(RunnerOptions):
    """``diffusion_type="sde"``: diffuse to t*, then the reverse process by ``solver``.

    eta (ddim), order (dpm-solver), time_grid (ddim, dpm-solver, dpm-solver++, heun): the solver's own options
    (``Solver.options``), None until given; stored as used (the solver's default where not given), and an error
    naming the option when given to a solver that does not take it."""

    t_star: float = 0.1
    dt: float | None = None    # None: DEFAULT_DT for solver="euler" without steps, else none (stored as used)
    steps: int | None = None
    solver: str = "euler"
    eta: float | None = None
    order: int | None = None
    time_grid: str | None = None
    diffusion_type: str = "sde"

    def __post_init__(self):
        self._check_type("sde")
        self._set("t_star", check_float("t_star", self.t_star, low=0.0, high=1.0, low_open=True))
        check_choice("solver", self.solver, tuple(SOLVERS))
        if self.solver == "euler" and self.t_star <= T_END:
            raise OptionError("t_star", f"the reverse SDE runs from t* down to {T_END}; expected a value > {T_END}, "
                                        f"got {self.t_star}")
        if self.steps is not None:
            self._set("steps", check_int("steps", self.steps))
        self._solver_options()
        if self.dt is not None:
            self._set("dt", check_float("dt", self.dt, low=0.0, low_open=True))
            # A dt that would not be used is an error, never ignored.
            if self.solver == "ddpm":
                raise OptionError("dt", lambda s: f"{s.setting('solver', self.solver)} walks discrete levels and "
                                                  f"takes no step size; give {s.name('steps')} (default: one step "
                                                  f"per level)")
            if self.solver != "euler":
                raise OptionError("dt", lambda s: f"{s.setting('solver', self.solver)} takes a step count "
                                                  f"{s.name('steps')} (network calls), not a step size")
            if self.steps is not None:
                raise OptionError("dt", lambda s: f"give a step size {s.name('dt')} or a step count "
                                                  f"{s.name('steps')}, not both")
        elif self.solver == "euler" and self.steps is None:
            self._set("dt", DEFAULT_DT)

    def _solver_options(self) -> None:
        """Check eta / order / time_grid against the solver's own options; fill in its defaults."""
        own = SOLVERS[self.solver].options
        for name in SOLVER_OPTIONS:
            v = getattr(self, name)
            if name not in own:
                if v is not None:
                    takers = [n for n, sv in SOLVERS.items() if name in sv.options]
                    raise OptionError(name, lambda s, takers=takers: (
                        f"not an option of {s.setting('solver', self.solver)} (it is an option of "
                        f"{' and '.join(s.setting('solver', n) for n in takers)})"))
                continue
            if v is None:
                self._set(name, own[name])
            elif name == "eta":
                self._set(name, check_float(name, v, low=0.0, high=1.0))
            elif name == "order":
                self._set(name, check_choice(name, check_int(name, v), DPM_SOLVER_ORDERS))
            elif not isinstance(v, str):
                raise OptionTypeError(name, f"expected a str, got {v!r} of type {type(v).__name__}")


@dataclass(frozen=True)
class ODEOptions(RunnerOptions):
    """``diffusion_type="ode"``: the probability-flow ODE (``solvers.ode``)."""

    t_star: float = 0.1
    step_size: float = 1e-3
    diffusion_type: str = "ode"

    def __post_init__(self):
        self._check_type("ode")
        self._set("t_star", _check_t_star(self.t_star, "ode"))
        self._set("step_size", check_float("step_size", self.step_size, low=0.0, low_open=True))


@dataclass(frozen=True)
class LDSDEOptions(RunnerOptions):
    """``diffusion_type="ldsde"``: Langevin dynamics around the input (``solvers.langevin``)."""

    t_star: float = 0.1
    dt: float = 1e-2
    sigma2: float = 1e-3
    lambda_ld: float = 1e-2
    eta: float = 5.0
    diffusion_type: str = "ldsde"

    def __post_init__(self):
        self._check_type("ldsde")
        self._set("t_star", _check_t_star(self.t_star, "ldsde"))
        self._set("dt", check_float("dt", self.dt, low=0.0, low_open=True))
        self._set("sigma2", check_float("sigma2", self.sigma2, low=0.0, low_open=True))
        self._set("lambda_ld", check_float("lambda_ld", self.lambda_ld, low=0.0, low_open=True))
        self._set("eta", check_float("eta", self.eta, low=0.0))


@dataclass(frozen=True)
class GuidedDDPMOptions(RunnerOptions):
    """``diffusion_type="ddpm"``: guided-diffusion's ``p_sample(clip_denoised=True)`` at every level."""

    t_star: float = 0.1
    diffusion_type: str = "ddpm"

    def __post_init__(self):
        self._check_type("ddpm")
        self._set("t_star", check_float("t_star", self.t_star, low=0.0, high=1.0, low_open=True))


@dataclass(frozen=True)
class CelebAHQOptions(RunnerOptions):
    """``diffusion_type="celebahq-ddpm"``: SDEdit's ancestral step at every level."""

    t_star: float = 0.5
    var_type: str = "fixedsmall"
    diffusion_type: str = "celebahq-ddpm"

    def __post_init__(self):
        self._check_type("celebahq-ddpm")
        self._set("t_star", check_float("t_star", self.t_star, low=0.0, high=1.0, low_open=True))
        check_choice("var_type", self.var_type, VAR_TYPES)


class LangevinAnchor(Guidance):
    """G_k = w_k x_in: the LD-SDE drift's pull toward the input, ``w_k = h_k lambda / (2 sigma2)``."""

    accepts_given_noise = True

    def __init__(self, anchors: tuple[float, ...]):
        self.anchors = anchors

    def active(self, k: int) -> bool:
        return True

    def term(self, k: int, step: Step, x: torch.Tensor, eps: torch.Tensor, ref: torch.Tensor, noise: Noise, *,
             create_graph: bool, var: torch.Tensor | None = None) -> torch.Tensor:
        return ref * self.anchors[k]


class GuidedDiffusionTerm(Guidance):
    """What guided-diffusion's ``p_sample(clip_denoised=True)`` adds to the posterior mean of the unclipped x0 (the
    plan's ``a x + b eps``): ``coef1 (clip(x0) - x0)`` and, above level 0, the noise ``exp(logvar / 2) z_k`` with
    ``logvar = (v + 1)/2 log(beta) + (1 - v)/2 log(posterior variance, clipped)`` from the network's variance
    channels v (``LEARNED_RANGE``; ``rescale_learned_sigmas`` does not touch the sampler)."""

    needs_variance = True
    accepts_given_noise = True

    def __init__(self, levels: tuple[DDPMLevel, ...]):
        self.levels = levels

    def active(self, k: int) -> bool:
        return True

    def term(self, k: int, step: Step, x: torch.Tensor, eps: torch.Tensor, ref: torch.Tensor, noise: Noise, *,
             create_graph: bool, var: torch.Tensor | None = None) -> torch.Tensor:
        lv = self.levels[step.level]
        out = clipped_x0_correction(lv, x, eps)
        if step.level == 0:   # no noise on the last step (guided-diffusion draws it and masks it)
            return out
        frac = (var + 1.0) * 0.5
        logvar = frac * math.log(lv.beta) + (1.0 - frac) * lv.logvar_clipped
        return out + torch.exp(0.5 * logvar) * noise.unit(k, x)


def _level(schedule: VPSchedule, opts: RunnerOptions) -> int:
    """The integer diffusion level ``N t*`` (the official ``--t``) of a runner that diffuses; a t* that is not a
    multiple of 1/N is an error (the official runners take the level itself)."""
    n = schedule.num_levels
    level = schedule.level_of(opts.t_star)
    if level < 1 or abs(n * opts.t_star - level) > 1e-9 * n:
        raise OptionError("t_star", lambda s: f"{s.setting('diffusion_type', opts.diffusion_type)} diffuses to the "
                                              f"integer level {n} t* (the official --t); expected a positive multiple "
                                              f"of 1/{n}, got {opts.t_star!r}")
    return level


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


class DiffPure(Method):
    name = "diffpure"
    Options = RunnerOptions

    def options(self, **kwargs) -> RunnerOptions:
        kind = kwargs.get("diffusion_type", "sde")
        check_choice("diffusion_type", kind, DIFFUSION_TYPES)
        return make_options(_OPTIONS[kind], (("method", self.name), ("diffusion_type", kind)), kwargs)

    def plan(self, opts: DiffPureOptions, schedule: VPSchedule, dtype: torch.dtype = torch.float32) -> Plan:
        """The sde runner's step coefficients for states of ``dtype`` (the Euler grid is accumulated in it, as
        torchsde does): ``steps`` equal steps, or the grid of step size ``dt``."""
        if schedule.level_of(opts.t_star) < 1:
            raise OptionError("t_star", f"expected round({schedule.num_levels} t*) >= 1 (DiffPure's diffusion level), "
                                        f"got {opts.t_star}")
        solver = get_solver(opts.solver)
        return solver.plan(schedule, opts.t_star, dt=opts.dt, steps=opts.steps, dtype=_np_dtype(dtype),
                           **{name: getattr(opts, name) for name in solver.options})

    def chain(self, opts: RunnerOptions, schedule: VPSchedule, dtype: torch.dtype, guidance_grad: str) -> Chain:
        kind, np_dtype = opts.diffusion_type, _np_dtype(dtype)
        if kind == "sde":
            # DiffPure's forward diffusion uses the discrete alpha_bar at level round(N t*) - 1.
            return Chain((diffuse_round(self.plan(opts, schedule, dtype), schedule,
                                        schedule.level_of(opts.t_star) - 1),))
        if kind == "ldsde":
            plan, anchors = langevin_plan(schedule, opts.t_star, opts.dt, lambda_ld=opts.lambda_ld,
                                          sigma2=opts.sigma2, eta=opts.eta, dtype=np_dtype)
            return Chain((Round(plan, 1.0, 0.0),), LangevinAnchor(anchors))
        level = _level(schedule, opts)
        if kind == "ode":
            return Chain((diffuse_round(ode_euler_plan(schedule, opts.t_star, opts.step_size, np_dtype), schedule,
                                        level - 1),))
        if kind == "celebahq-ddpm":
            return Chain((diffuse_round(epsilon_mean_plan(schedule, level, opts.var_type), schedule, level - 1),))
        plan = Plan("guided_ddpm", posterior_mean_steps(schedule, level, lambda lv, i: 0.0),
                    "standard normal draws z_k (scaled by the network's learned std inside the step's term)")
        return Chain((diffuse_round(plan, schedule, level - 1),), GuidedDiffusionTerm(ddpm_levels(schedule)))

    def check_adjoint(self, opts: RunnerOptions) -> None:
        kind = opts.diffusion_type
        if kind == "ode" or (kind == "sde" and opts.solver == "euler" and opts.steps is None):
            return
        why = {"sde": "torchsde's adjoint of DiffPure's Euler–Maruyama solve needs solver='euler' with dt (not "
                      "steps)",
               "ldsde": "the official torchsde adjoint of the Langevin runner drops the path through x_in (it is not "
                        "an adjoint parameter), so it is not this chain's gradient",
               }.get(kind, f"the official {kind!r} runner computes no gradient (it runs under torch.no_grad)")
        raise OptionError("grad_mode", lambda s: f"'adjoint' with {s.setting('diffusion_type', kind)}: {why}; use "
                                                 f"'full', the exact gradient")

    def check_model(self, opts: RunnerOptions, model) -> None:
        if opts.diffusion_type == "ddpm" and not model.has_learned_variance:
            raise OptionError("model", lambda s: f"{s.setting('diffusion_type', 'ddpm')} (guided-diffusion's "
                                                 f"p_sample) scales its noise by the network's learned variance; this "
                                                 f"model has none (a guided-diffusion ADM with learn_sigma has). For a "
                                                 f"fixed-variance network use "
                                                 f"{s.setting('diffusion_type', 'celebahq-ddpm')} or "
                                                 f"{s.setting('solver', 'ddpm')}")
        model_var = getattr(model, "var_type", None)
        if opts.diffusion_type == "celebahq-ddpm" and model_var not in (None, opts.var_type):
            raise OptionError("var_type", lambda s: f"the model's config says var_type={model_var!r} (config['model']"
                                                    f"['var_type']), the celebahq-ddpm runner has "
                                                    f"{s.setting('var_type', opts.var_type)}; pass "
                                                    f"{s.setting('var_type', model_var)} (the official runner reads it "
                                                    f"from the config)")

    def surrogate_t_star(self, opts: RunnerOptions, schedule: VPSchedule) -> float:
        return opts.t_star

    def surrogate_origin(self, opts: RunnerOptions):
        return "t_star", opts.t_star

    def start_level(self, opts: RunnerOptions, schedule: VPSchedule) -> int:
        """The level the forward diffusion reaches (``sde``: DiffPure's rounded round(N t*); ``ode``, ``ddpm``,
        ``celebahq-ddpm``: the exact N t*); 0 for ``ldsde``, which does not diffuse."""
        if opts.diffusion_type == "ldsde":
            return 0
        return schedule.level_of(opts.t_star) if opts.diffusion_type == "sde" else _level(schedule, opts)

    def describe(self, opts: RunnerOptions) -> str:
        # a solver option the run's solver does not take is None: not part of what ran
        names = [k for k in opts.names()[:-1] if not (k in SOLVER_OPTIONS and getattr(opts, k) is None)]
        return ", ".join(f"{k}={getattr(opts, k)!r}" for k in ("diffusion_type", *names))


_OPTIONS = {"sde": DiffPureOptions, "ode": ODEOptions, "ldsde": LDSDEOptions, "ddpm": GuidedDDPMOptions,
            "celebahq-ddpm": CelebAHQOptions}
