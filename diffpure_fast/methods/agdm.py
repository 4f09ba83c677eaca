"""AGDM (Lin, Tao, Zhang, Tanaka, Zhao, "Adversarial Guided Diffusion Models for Adversarial Purification", arXiv
2403.16067 v5, Neural Networks 2025): the DDPM reverse process guided by an adversarially trained auxiliary
network ``c_phi``, with the distance measured in its latent space. **A reconstruction**: no code has been published
(the authors' repository says "coming soon"); everything below that is not marked [paper] is our reading.

[paper] The guided reverse process ``p(x_{t-1} | x_t, y, x') ∝ p_theta(x_{t-1} | x_t) p_phi(x' | x_t) p_phi(y | x_t)``
with ``p_phi(x' | x_t) ∝ exp(-D(c_phi(x'), c_phi(x_t)))`` and ``p_phi(y | x_t) = softmax(c_phi(x_t))_y``; x' is the
(possibly adversarial) input, D a distance between latent representations (an MSE, per the ICLR 2025 reviews), one
scale s for both terms; purification from diffusion step 70 of 1000 (t* = 0.07); c_phi sees x_t, no time input.

[our reading] As classifier guidance (Dhariwal & Nichol 2021) shifts the mean, each ancestral DDPM step (the
respaced chain of ``solvers.ddpm`` from level round(N t*) - 1 down to 0, after the input is diffused there) is

    x_{k+1} = mu_theta(x_k) + s_k Sigma_k grad_{x_k} Phi_k + sqrt(Sigma_k) z_k,
    Phi_k   = -D(c_phi(x'), c_phi(u_k)) + log softmax(c_phi(u_k))_{y_hat},

with Sigma_k the step's posterior variance (so the last step, to level -1, is unguided), u_k = x_k
(``aux_input="x_t"``, as written) or the predicted x0 ``(x_k - sqrt(1 - abar) eps) / sqrt(abar)``
(``aux_input="x0_hat"``), y_hat the auxiliary's prediction on x' (``label="adversarial"``), and per-sample terms
(each sample's guidance depends on that sample only, whatever its batch). Every such choice is an option:

* ``scale`` (s; no value is published) and ``scale_schedule``: ``"constant"`` or ``"noise"`` (s sqrt(1 - abar_k)
  / sqrt(1 - abar_0): strongest at the first, noisiest step). The default 3000 is ours, calibrated on the digits
  models: there the guidance's per-pixel size is about 1.5 times the noise std of the first step (0.25 times at the
  last guided step); a different auxiliary network or image size needs its own value;
* ``distance``: ``"feature_mse"`` (mean over features), ``"logit_mse"``, or ``"kl"`` (KL(softmax c(x') ||
  softmax c(u)));
* ``feature_layer``: None (the auxiliary returns ``(features, logits)``) or the name of a submodule whose output is
  the latent representation (a plain classifier then works as the auxiliary, ``models.auxiliary``);
* ``aux_input``: ``"x_t"`` or ``"x0_hat"`` (the latter differentiates through the score network in every step);
* ``label``: ``"adversarial"`` (argmax c(x')), ``"current"`` (argmax c(u_k), per step), or ``"none"`` (no class
  term: the distance alone);
* ``aux_value_range``: the range the auxiliary takes its images in (the chain works in [-1, 1]).

Gradients: ``guidance_grad="exact"`` differentiates the guidance (a double backward through c_phi at every step, and
the path through c_phi(x'), since x' is the attacked input itself); ``"detached"`` treats the guidance as a constant
(the gradient of an attacker who ignores the guidance). Whether the paper's attacks went through the guidance is
not stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validate import (
    OptionError,
    OptionTypeError,
    check_choice,
    check_eval_mode,
    check_float,
    check_int,
    check_value_range,
)
from ..chain import Chain, Guidance, Noise
from ..models.auxiliary import auxiliary_outputs
from ..schedule import VPSchedule
from ..solvers import get_solver
from ..solvers.base import Step
from .base import Method, MethodOptions, diffuse_round

__all__ = ["AGDM", "AGDMGuidance", "AGDMOptions", "DISTANCES"]

DISTANCES = ("feature_mse", "logit_mse", "kl")
SCALE_SCHEDULES = ("constant", "noise")
AUX_INPUTS = ("x_t", "x0_hat")
LABELS = ("adversarial", "current", "none")


@dataclass(frozen=True)
class AGDMOptions(MethodOptions):
    auxiliary: nn.Module | None = None
    t_star: float = 0.07
    steps: int | None = None
    scale: float = 3000.0
    scale_schedule: str = "constant"
    distance: str = "feature_mse"
    feature_layer: str | None = None
    aux_input: str = "x_t"
    label: str = "adversarial"
    aux_value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if not isinstance(self.auxiliary, nn.Module):
            raise OptionTypeError("auxiliary", lambda s: f"{s.setting('method', 'agdm')} needs the auxiliary network "
                                                         "c_phi, an nn.Module returning (features, logits) (e.g. "
                                                         "dpf.load_auxiliary('digits')), got "
                                                         f"{type(self.auxiliary).__name__}")
        check_eval_mode("auxiliary", self.auxiliary)
        self._set("t_star", check_float("t_star", self.t_star, low=0.0, high=1.0, low_open=True))
        if self.steps is not None:
            self._set("steps", check_int("steps", self.steps))
        self._set("scale", check_float("scale", self.scale, low=0.0))
        check_choice("scale_schedule", self.scale_schedule, SCALE_SCHEDULES)
        check_choice("distance", self.distance, DISTANCES)
        if self.feature_layer is not None and not isinstance(self.feature_layer, str):
            raise OptionTypeError("feature_layer", f"expected a submodule name (str) or None, got "
                                                   f"{type(self.feature_layer).__name__}")
        check_choice("aux_input", self.aux_input, AUX_INPUTS)
        check_choice("label", self.label, LABELS)
        vr = self.aux_value_range
        self._set("aux_value_range", check_value_range("aux_value_range", vr))


class AGDMGuidance(Guidance):
    """G_k = w_k grad_{x_k} Phi_k, with w_k = s_k Sigma_k (module docstring); ``mode`` "detached" returns it as a
    constant."""

    needs_autograd = True

    def __init__(self, opts: AGDMOptions, weights: dict[int, float], abar: dict[int, float], mode: str):
        self.opts, self.weights, self.abar, self.mode = opts, weights, abar, mode
        self.needs_eps_graph = opts.aux_input == "x0_hat"
        self._need_features = opts.distance == "feature_mse"

    def active(self, k: int) -> bool:
        return self.weights.get(k, 0.0) != 0.0

    def aux(self, x_unit: torch.Tensor):
        """(features, logits) of the auxiliary on images in [-1, 1] (mapped to ``aux_value_range``)."""
        lo, hi = self.opts.aux_value_range
        x = x_unit if (lo, hi) == (-1.0, 1.0) else (x_unit + 1.0) * ((hi - lo) / 2.0) + lo
        return auxiliary_outputs(self.opts.auxiliary, x, self.opts.feature_layer, need_features=self._need_features)

    def log_density(self, u: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Phi per sample (B,): -D(c(x'), c(u)) + log softmax(c(u))_{y_hat}; u, ref: (B, C, H, W) in [-1, 1]."""
        o = self.opts
        f_u, l_u = self.aux(u)
        f_r, l_r = self.aux(ref)
        if o.distance == "feature_mse":
            if f_u.shape != f_r.shape:
                raise ValueError(f"auxiliary: features of different shapes for x_t and x' ({tuple(f_u.shape)}, "
                                 f"{tuple(f_r.shape)})")
            d = (f_r - f_u).square().mean(1)
        elif o.distance == "logit_mse":
            d = (l_r - l_u).square().mean(1)
        else:
            logp_r = F.log_softmax(l_r, dim=1)
            d = (logp_r.exp() * (logp_r - F.log_softmax(l_u, dim=1))).sum(1)
        if o.label == "none":
            return -d
        y_hat = (l_r if o.label == "adversarial" else l_u).detach().argmax(1)
        return -d + F.log_softmax(l_u, dim=1).gather(1, y_hat[:, None])[:, 0]

    def term(self, k: int, step: Step, x: torch.Tensor, eps: torch.Tensor, ref: torch.Tensor, noise: Noise, *,
             create_graph: bool, var: torch.Tensor | None = None) -> torch.Tensor:
        if self.opts.aux_input == "x_t":
            u = x
        else:
            ab = self.abar[k]
            u = (x - eps * math.sqrt(1.0 - ab)) / math.sqrt(ab)
        phi = self.log_density(u, ref).sum()   # per-sample terms: the sum's gradient is each sample's own
        # retain_graph: with aux_input="x0_hat" the graph runs through eps, which the adjoint's VJP of this step
        # differentiates again.
        (grad,) = torch.autograd.grad(phi, x, create_graph=create_graph and self.mode != "detached",
                                      retain_graph=True)
        g = grad * self.weights[k]
        return g.detach() if self.mode == "detached" else g


class AGDM(Method):
    name = "agdm"
    Options = AGDMOptions
    guidance_grads = ("exact", "detached")

    def chain(self, opts: AGDMOptions, schedule: VPSchedule, dtype: torch.dtype, guidance_grad: str) -> Chain:
        check_choice("guidance_grad", guidance_grad, self.guidance_grads)
        level = self.start_level(opts, schedule)
        if level < 1:
            raise OptionError("t_star", f"expected round({schedule.num_levels} t*) >= 1, got {opts.t_star}")
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        plan = get_solver("ddpm").plan(schedule, opts.t_star, dt=None, steps=opts.steps, dtype=np_dtype)
        alpha_bar = schedule.discrete_alpha_bar().tolist()
        first = math.sqrt(1.0 - alpha_bar[plan.steps[0].level])
        weights, abar = {}, {}
        for k, step in enumerate(plan.steps):
            ab = alpha_bar[step.level]
            s = opts.scale * (math.sqrt(1.0 - ab) / first if opts.scale_schedule == "noise" else 1.0)
            weights[k] = s * step.c_unit ** 2      # Sigma_k: the posterior variance of this step
            abar[k] = ab
        return Chain((diffuse_round(plan, schedule, level - 1),), AGDMGuidance(opts, weights, abar, guidance_grad))

    def surrogate_t_star(self, opts: AGDMOptions, schedule: VPSchedule) -> float:
        return opts.t_star

    def surrogate_origin(self, opts: AGDMOptions):
        return "t_star", opts.t_star

    def start_level(self, opts: AGDMOptions, schedule: VPSchedule) -> int:
        return schedule.level_of(opts.t_star)

    def check_inputs(self, opts: AGDMOptions, x: torch.Tensor) -> None:
        """The auxiliary network sits on x's device and has no submodule in training mode (checked at every call:
        the caller may have switched it since the options were built). (A network that cannot take x's shape or
        dtype, or returns no features, fails at the first guided step with an error naming ``auxiliary``: no probe
        call here, since purify runs at every attack step.)"""
        net = opts.auxiliary
        for p in net.parameters():
            if p.device != x.device:
                raise OptionError("auxiliary", f"its parameters are on {p.device} but x is on {x.device}; move one "
                                               f"of them")
            break
        check_eval_mode("auxiliary", net)

    def describe(self, opts: AGDMOptions) -> str:
        return ", ".join(f"{k}={type(v).__name__ if k == 'auxiliary' else repr(v)}"
                         for k in opts.names() for v in (getattr(opts, k),))
