"""MimicDiffusion (Song et al., CVPR 2024), as released (``psky1111/MimicDiffusion``, ``purification.py``:
``PurificationForward_mimic``).

The chain starts from pure noise (the released ``forward`` computes a noised input and then passes
``randn_like`` instead) and runs ``steps`` ancestral DDPM steps (eta = 1) at stride ``1000 / steps`` over the
1000-level schedule (levels 999, 989, .., 9 by default). A step from level i to j (j = -1: alpha_bar = 1):

    x0 = (x - sqrt(1 - a_i) eps(x, i)) / sqrt(a_i),   c1 = eta sqrt((1 - a_i/a_j)(1 - a_j)/(1 - a_i)),
    c2 = sqrt(1 - a_j - c1^2),                       x' = sqrt(a_j) x0 + c1 z + c2 eps - G,
    G  = rho sqrt(a_i) grad_x [ L1(x0, ref) + L1(up4(x0), up4(ref)) ]      on steps ``guidance_window`` only,

where ``ref = 2 x_in - 1``, ``L1(u, v)`` is the channel-wise L1 norm averaged over pixels (and batch) and ``up4``
is x4 nearest upsampling (so the two terms are equal, and G = 2 rho sign(x0 - ref) / (n H W)). Defaults: 100 steps,
guidance on steps 21..89 (the released ``90 > count > 20``; an earlier revision guided every step:
``guidance_window=(0, 100)``), rho = 3000. The network is called with the level i as its label, as released.

What the released code does that matters for evaluation:

* ``eps`` is detached inside the guidance gradient (``eps_in_guidance=False``): grad_x L = sign(x0 - ref) /
  (sqrt(a_i) n H W). ``eps_in_guidance=True`` keeps eps in the graph (as the paper's equations read; our option):
  then grad_x L = (I - sqrt(1 - a_i) J_eps)^T sign(.) / ..., one more backward through the network per step.
* The L1 means run over the batch too, so G scales with 1/B and a sample's result depends on its batch.
  ``norm_batch`` (default 16, the released script's ``--batch_size``) fixes the divisor: each sample's result is
  that of the released code at batch size 16, whatever batch it sits in; ``norm_batch=None`` is the released
  behaviour.
* The input enters only through the guidance, inside ``sign(x0 - ref)``. The exact input gradient of the released
  form is therefore zero almost everywhere: gradient masking, not robustness. The released evaluation attacked a
  different, unguided 5-step DDPM chain from t = 0.2 instead (here: ``grad_mode="surrogate"`` with
  ``surrogate_steps=5``). The honest choices, by ``guidance_grad``: ``"exact"`` (zero for the released form;
  informative with ``eps_in_guidance=True``), ``"detached"`` (as released: the guidance is a constant, also zero
  here since the chain starts from noise), ``"straight_through"`` (a declared surrogate: the forward is unchanged,
  the backward gives sign(u) the derivative of a smooth L1 with width ``st_beta``: 1/st_beta on |u| < st_beta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .._validate import OptionError, check_bool, check_choice, check_float, check_int
from ..chain import Chain, Guidance, Noise, Round
from ..schedule import VPSchedule
from ..solvers.base import Plan, Step
from .base import Method, MethodOptions

__all__ = ["Mimic", "MimicGuidance", "MimicOptions", "abs_smooth_curvature"]


@dataclass(frozen=True)
class MimicOptions(MethodOptions):
    steps: int = 100
    guidance_window: tuple[int, int] = (21, 90)
    rho: float = 3000.0
    upsample: int = 4
    norm_batch: int | None = 16
    eps_in_guidance: bool = False
    eta: float = 1.0
    st_beta: float = 1.0

    def __post_init__(self):
        # steps must also divide the schedule's levels: checked when the chain is built (Mimic.levels)
        self._set("steps", check_int("steps", self.steps))
        w = self.guidance_window
        if not isinstance(w, (tuple, list)) or len(w) != 2:
            raise OptionError("guidance_window", f"expected (start, stop) step indices, got {w!r}")
        w = tuple(check_int("guidance_window", v, low=0, high=self.steps) for v in w)
        if w[0] > w[1]:
            raise OptionError("guidance_window", f"expected (start, stop) with start <= stop <= steps={self.steps}, "
                                                 f"got {self.guidance_window!r}")
        self._set("guidance_window", w)
        self._set("rho", check_float("rho", self.rho, low=0.0))
        self._set("upsample", check_int("upsample", self.upsample))
        if self.norm_batch is not None:
            self._set("norm_batch", check_int("norm_batch", self.norm_batch))
        self._set("eps_in_guidance", check_bool("eps_in_guidance", self.eps_in_guidance))
        self._set("eta", check_float("eta", self.eta, low=0.0, high=1.0))
        self._set("st_beta", check_float("st_beta", self.st_beta, low=0.0, low_open=True))


class _AbsSmoothCurvature(torch.autograd.Function):
    """|u| whose first derivative is sign(u) and whose second derivative is that of a smooth L1 of width beta
    (1/beta on |u| < beta): the straight-through surrogate for the sign inside MimicDiffusion's guidance."""

    @staticmethod
    def forward(ctx, u, beta):
        ctx.save_for_backward(u)
        ctx.beta = beta
        return u.abs()

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        smooth = (u / ctx.beta).clamp(-1.0, 1.0)
        # Value sign(u), derivative d/du clamp(u / beta, -1, 1).
        return grad * (smooth + (torch.sign(u) - smooth).detach()), None


def abs_smooth_curvature(u: torch.Tensor, beta: float) -> torch.Tensor:
    return _AbsSmoothCurvature.apply(u, beta)


class MimicGuidance(Guidance):
    """G_k = -rho sqrt(a_i) grad_x[L1(x0, ref) + L1(up(x0), up(ref))] on the steps of the guidance window."""

    needs_autograd = True

    def __init__(self, opts: MimicOptions, alpha_bar: dict[int, float], mode: str):
        self.opts, self.alpha_bar, self.mode = opts, alpha_bar, mode
        self.needs_eps_graph = opts.eps_in_guidance

    def active(self, k: int) -> bool:
        return self.opts.guidance_window[0] <= k < self.opts.guidance_window[1]

    def _l1(self, u: torch.Tensor, n: float) -> torch.Tensor:
        """Channel-wise L1 norm, summed over pixels and divided by n x pixels (torch.norm(u, 1, 1).mean())."""
        a = abs_smooth_curvature(u, self.opts.st_beta) if self.mode == "straight_through" else u.abs()
        return a.sum() / (n * u.shape[2] * u.shape[3])

    def term(self, k: int, step: Step, x: torch.Tensor, eps: torch.Tensor, ref: torch.Tensor, noise: Noise, *,
             create_graph: bool, var: torch.Tensor | None = None) -> torch.Tensor:
        o = self.opts
        a_i = self.alpha_bar[step.level]
        e = eps if o.eps_in_guidance else eps.detach()
        x0 = (x - e * math.sqrt(1.0 - a_i)) / math.sqrt(a_i)
        n = float(o.norm_batch if o.norm_batch is not None else x.shape[0])
        loss = self._l1(x0 - ref, n)
        if o.upsample > 1:
            loss = loss + self._l1(F.interpolate(x0, scale_factor=o.upsample)
                                   - F.interpolate(ref, scale_factor=o.upsample), n)
        keep = create_graph and self.mode != "detached"
        # retain_graph: eps's graph may be shared with the adjoint's own VJP of this step.
        (grad,) = torch.autograd.grad(loss, x, create_graph=keep, retain_graph=True)
        g = grad * (-o.rho * math.sqrt(a_i))
        return g if keep else g.detach()


class Mimic(Method):
    name = "mimic"
    Options = MimicOptions
    guidance_grads = ("exact", "detached", "straight_through")

    @staticmethod
    def levels(opts: MimicOptions, schedule: VPSchedule) -> list[int]:
        """The released ``seq``: skip - 1, 2 skip - 1, .., N - 1 with skip = N / steps."""
        n = schedule.num_levels
        if n % opts.steps:
            raise OptionError("steps", f"expected a divisor of the schedule's {n} levels, got {opts.steps}")
        skip = n // opts.steps
        return [skip * (m + 1) - 1 for m in range(opts.steps)]

    def plan(self, opts: MimicOptions, schedule: VPSchedule) -> Plan:
        abar = schedule.discrete_alpha_bar().tolist()
        seq = self.levels(opts, schedule)
        steps = []
        for i, j in zip(reversed(seq), reversed([-1, *seq[:-1]])):
            at, aj = abar[i], (abar[j] if j >= 0 else 1.0)
            c1 = opts.eta * math.sqrt((1.0 - at / aj) * (1.0 - aj) / (1.0 - at))
            c2 = math.sqrt(max(1.0 - aj - c1 * c1, 0.0))
            # As released, the network is called with the level itself as its label: t = i / (N - 1) gives the
            # continuous-label models (999 t) exactly i; discrete models take the level.
            t = float(np.float32(i / (schedule.num_levels - 1)))
            steps.append(Step(t=t, level=i, a=math.sqrt(aj) / math.sqrt(at),
                              b=c2 - math.sqrt(aj) * math.sqrt(1.0 - at) / math.sqrt(at), c_unit=c1, c_increment=c1))
        return Plan("mimic", tuple(steps), "standard normal draws z_k (scaled by c1 inside the step)")

    def chain(self, opts: MimicOptions, schedule: VPSchedule, dtype: torch.dtype, guidance_grad: str) -> Chain:
        check_choice("guidance_grad", guidance_grad, self.guidance_grads)
        abar = schedule.discrete_alpha_bar().tolist()
        alpha_bar = {i: abar[i] for i in self.levels(opts, schedule)}
        return Chain((Round(self.plan(opts, schedule), 0.0, 1.0),), MimicGuidance(opts, alpha_bar, guidance_grad))

    def surrogate_t_star(self, opts: MimicOptions, schedule: VPSchedule) -> float:
        # The released attack model (PurificationForward): an unguided DDPM chain from t = 200 / 1000.
        return 0.2

    def start_level(self, opts: MimicOptions, schedule: VPSchedule) -> int:
        return schedule.num_levels   # pure noise
