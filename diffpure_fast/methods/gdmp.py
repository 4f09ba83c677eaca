"""GDMP (Wang et al. 2022, "Guided Diffusion Model for Adversarial Purification"), as released
(``JinyiW/GuidedDiffusionPur``: ``purification/diff_purify.py``, ``pytorch_diffusion/diffusion.py``).

``max_iter`` rounds; each diffuses the previous round's output (the input, first) to level ``purify_step`` with
``sqrt(abar[P]) y + sqrt(1 - abar[P]) z`` and runs ``purify_step`` ancestral DDPM steps over levels P-1 .. 0
(the released code diffuses to ``abar[P]`` and denoises from level P-1; reproduced as is). A step at level i:

    x0  = clip(sqrt(1/abar_i) x - sqrt(1/abar_i - 1) eps(x, i), -1, 1)
    mu  = coef1_i x0 + coef2_i x + exp(logvar_i) * scale_i * grad_x[-MSE(x, ref_i)]
    x'  = mu + exp(logvar_i / 2) z          (no noise at level 0)

with the "fixedlarge" variance ``logvar = log([post_var[1], betas[1:]])``, the reference ``ref_i`` a freshly noised
copy of the input at the same level (``sqrt(abar_i) x_in + sqrt(1 - abar_i) z'``, its noise from the counter
generator's guidance stream), and the repository's scale ``guide_scale * 3 * 255 / (2 ptb) * sqrt(1 - abar_i) /
sqrt(abar_i)`` (its ``compute_scale``). ``guide_mode="ssim"``: ``grad_x SSIM(x, ref_i)`` (pytorch_ssim's SSIM:
11x11 Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2) instead of the MSE. Defaults: the repository's
CIFAR-10 ``configs/cifar10_MSE.yml`` (36 steps x 4 rounds, MSE, guide_scale 60000, ptb 8 for an 8/255 budget).

What matters for evaluation:

* The MSE (and SSIM) is a mean over the whole batch in the released code, so a sample's guidance scales with 1/B
  and depends on its batch. ``norm_batch`` (default 100, the config's ``bsize``) fixes the count the mean divides
  by: each sample's result is then that of the released code run at batch size ``norm_batch``, whatever batch it
  sits in. ``norm_batch=None`` is the released behaviour (divide by the actual batch size).
* The released attacks (``clf_pgd``, ``bpda_strong``) never differentiate through the guidance. The exact gradient
  (``guidance_grad="exact"``) does: through the noised reference at every step and through the clipped x0.
  ``guidance_grad="detached"`` treats the guidance term (not the clipping, which is part of the step) as a constant.
* The released code clamps the final image to [0, 1]; ``purify`` does not clip (its contract), so outputs can
  overshoot slightly; classifiers see the unclipped image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validate import OptionError, check_bool, check_choice, check_float, check_int
from ..chain import Chain, Guidance, Noise
from ..schedule import VPSchedule
from ..solvers.base import Plan, Step
from ..solvers.ddpm import DDPMLevel, clipped_x0_correction, ddpm_levels, posterior_mean_steps
from .base import Method, MethodOptions, diffuse_round

__all__ = ["GDMP", "GDMPGuidance", "GDMPOptions", "STREAM_GUIDANCE", "ssim"]

# Counter stream of the guidance's own noise (GDMP's noised reference). Streams 0/1 are the forward and solver
# noise; 2 + j are the continuous adjoint's bridge points, so this one sits far above them.
STREAM_GUIDANCE = 1 << 31


@dataclass(frozen=True)
class GDMPOptions(MethodOptions):
    purify_step: int = 36
    max_iter: int = 4
    guide_mode: str = "mse"
    guide_scale: float = 60000.0
    ptb: float = 8.0
    norm_batch: int | None = 100
    clip_x0: bool = True

    def __post_init__(self):
        # purify_step's upper bound is the schedule's (N - 1 levels), checked when the chain is built
        self._set("purify_step", check_int("purify_step", self.purify_step))
        self._set("max_iter", check_int("max_iter", self.max_iter))
        check_choice("guide_mode", self.guide_mode, ("mse", "ssim"))
        self._set("guide_scale", check_float("guide_scale", self.guide_scale, low=0.0))
        self._set("ptb", check_float("ptb", self.ptb, low=0.0, low_open=True))
        if self.norm_batch is not None:
            self._set("norm_batch", check_int("norm_batch", self.norm_batch))
        self._set("clip_x0", check_bool("clip_x0", self.clip_x0))


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(like)
    return (g[:, None] @ g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """pytorch_ssim's SSIM map reduced per sample: (B,) means over (C, H, W). x, y: (B, C, H, W)."""
    c = x.shape[1]
    w = _gaussian_window(window_size, 1.5, c, x)
    pad = window_size // 2
    mu_x = F.conv2d(x, w, padding=pad, groups=c)
    mu_y = F.conv2d(y, w, padding=pad, groups=c)
    sxx = F.conv2d(x * x, w, padding=pad, groups=c) - mu_x * mu_x
    syy = F.conv2d(y * y, w, padding=pad, groups=c) - mu_y * mu_y
    sxy = F.conv2d(x * y, w, padding=pad, groups=c) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


class GDMPGuidance(Guidance):
    """G_k = coef1 (clip(x0) - x0) + exp(logvar) scale grad_x[-MSE(x, ref_k)] (or + grad_x SSIM): the x0 clipping
    (part of the released step, always differentiated) and the guidance toward the noised input."""

    def __init__(self, opts: GDMPOptions, levels: tuple[DDPMLevel, ...], mode: str):
        self.opts, self.levels, self.mode = opts, levels, mode
        self.needs_autograd = opts.guide_mode == "ssim"

    def active(self, k: int) -> bool:
        return True

    def _norm(self, x: torch.Tensor) -> float:
        return float(self.opts.norm_batch if self.opts.norm_batch is not None else x.shape[0])

    def term(self, k: int, step: Step, x: torch.Tensor, eps: torch.Tensor, ref: torch.Tensor, noise: Noise, *,
             create_graph: bool, var: torch.Tensor | None = None) -> torch.Tensor:
        lv, o = self.levels[step.level], self.opts
        out = clipped_x0_correction(lv, x, eps) if o.clip_x0 else 0.0
        ab = lv.alpha_bar
        ref_t = ref * math.sqrt(ab) + noise.draw(k, STREAM_GUIDANCE, ref) * math.sqrt(1.0 - ab)
        scale = o.guide_scale * 3.0 * 255.0 / (2.0 * o.ptb) * math.sqrt(1.0 - ab) / math.sqrt(ab)
        if o.guide_mode == "mse":
            # grad_x of -sum((x - ref_t)^2) / (norm_batch C H W): closed form.
            grad = (x - ref_t) * (-2.0 / (self._norm(x) * x[0].numel()))
        else:
            score = ssim(x, ref_t).sum() / self._norm(x)
            # retain_graph: the step's graph may be shared with the adjoint's own VJP of this step.
            (grad,) = torch.autograd.grad(score, x, create_graph=create_graph and self.mode != "detached",
                                          retain_graph=True)
        cond = grad * (scale * math.exp(lv.logvar_large))
        if self.mode == "detached":
            cond = cond.detach()
        return out + cond


class GDMP(Method):
    name = "gdmp"
    Options = GDMPOptions
    guidance_grads = ("exact", "detached")

    def plan(self, opts: GDMPOptions, schedule: VPSchedule, dtype: torch.dtype) -> Plan:
        """The unclipped part of pytorch_diffusion's step over levels P-1 .. 0: a x + b eps + c z with
        a = coef1 sqrt(1/abar) + coef2, b = -coef1 sqrt(1/abar - 1), c = exp(logvar / 2) (0 at level 0)."""
        steps = posterior_mean_steps(schedule, opts.purify_step,
                                     lambda lv, i: math.exp(0.5 * lv.logvar_large) if i > 0 else 0.0)
        return Plan("gdmp", steps, "standard normal draws z_k (scaled by exp(logvar / 2) inside the step)")

    def chain(self, opts: GDMPOptions, schedule: VPSchedule, dtype: torch.dtype, guidance_grad: str) -> Chain:
        check_choice("guidance_grad", guidance_grad, self.guidance_grads)
        p = opts.purify_step
        if p > schedule.num_levels - 1:
            raise OptionError("purify_step", f"expected at most {schedule.num_levels - 1} (the model's schedule has "
                                             f"{schedule.num_levels} levels and a round diffuses to level "
                                             f"purify_step), got {p}")
        plan = self.plan(opts, schedule, dtype)
        rounds = tuple(diffuse_round(plan, schedule, p, first_step=r * p) for r in range(opts.max_iter))
        return Chain(rounds, GDMPGuidance(opts, ddpm_levels(schedule), guidance_grad))

    def surrogate_t_star(self, opts: GDMPOptions, schedule: VPSchedule) -> float:
        return opts.purify_step / schedule.num_levels

    def surrogate_origin(self, opts: GDMPOptions):
        return "purify_step", opts.purify_step

    def start_level(self, opts: GDMPOptions, schedule: VPSchedule) -> int:
        return opts.purify_step
