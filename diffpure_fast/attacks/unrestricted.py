"""Unrestricted attacks through the purifier, with EOT: the low-frequency attack (LF), perceptual PGD (PPGD) and
spatially transformed adversarial examples (StAdv). None has an L-p budget: LF and PPGD are bounded in LPIPS
(``attacks.perceptual``), StAdv by the size of its flow field; every returned sample satisfies its bound as measured.

Each runs ``steps`` iterations; iteration s takes the EOT gradient of ``eot`` purification draws at the current
iterate (``pgd.eot_gradient``, purifier seed ``derive_seed(seed, NAME, s)`` or ``noise_seed``: fixed noise), records
the EOT prediction and loss, and moves; a last EOT evaluation scores the final iterate. The run returns the iterate of
highest EOT loss among iterates 1..S (iterate 0 is the clean image or a point next to it, never a candidate).

* ``lf_attack`` (our reading of "low-frequency" attacks; DiffBreak's LF optimises a learned low-pass filter, ours a
  low-resolution perturbation): the perturbation is ``up(v)``, ``v`` of size (C, ceil(H / f), ceil(W / f)) upsampled
  bilinearly, so it holds no frequency above the coarse grid's; v moves by ``step_size * sign(d L / d v)`` and the
  image ``clip(x + up(v), 0, 1)`` is projected into the LPIPS ball by bisection (``perceptual.lpips_project``), v
  scaled by the same factor.
* ``ppgd_attack`` (Laidlaw, Singla & Feizi, ICLR 2021, ``PerceptualPGDAttack``): each step solves the linearised
  problem ``max g^T d s.t. ||J d|| <= step`` (J the Jacobian of the LPIPS features at the iterate) by ``cg_steps``
  conjugate-gradient iterations on ``J^T J d = g`` with finite-difference products (h = 1e-3), scales d to LPIPS
  length ``step = 2 bound / steps``, then projects into the ball (bisection, where they use Newton's method with a
  bisection fallback). Start: x plus N(0, 0.01^2) noise, seeded per sample.
* ``stadv_attack`` (Xiao et al., ICLR 2018; Laidlaw et al.'s ``StAdvAttack``, which DiffPure's unseen-threat row
  runs): a flow field f (B, H, W, 2) in ``grid_sample`` units (half the image width is 1: bound 0.05, their default,
  is 0.4 px on 16 px images and 0.8 px on 32 px), ``x_adv = bilinear warp of x by f``; f moves by ``step_size *
  sign(d/df [L - smoothness L_flow])`` and is clipped to ``|f|_inf <= bound``; ``L_flow = sum over neighbouring pixel
  pairs p, q of sqrt(||f_p - f_q||^2 + 1e-8)`` (Xiao et al.'s Eq. 4, each pair once), smoothness 0.05 (Xiao et al.'s
  tau; Laidlaw et al.'s 0.0025 / bound at bound 0.05).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validate import check_float, check_int
from .perceptual import LPIPS, lpips_project
from .pgd import eot_gradient
from .randomness import attack_seed, derive_seed

__all__ = ["UnrestrictedResult", "flow_smoothness", "lf_attack", "ppgd_attack", "stadv_attack", "warp"]


@dataclass
class UnrestrictedResult:
    """One run on a batch of B: x_adv (B, C, H, W) in [0, 1], the iterate of highest EOT loss among 1..S; measure
    (B,) float64 its bound's quantity (LPIPS distance, or the flow's L-inf size), <= the bound; pred_trace,
    loss_trace: (S + 1, B) the EOT prediction and loss at each iterate (0: the start)."""

    x_adv: torch.Tensor
    measure: torch.Tensor
    pred_trace: torch.Tensor
    loss_trace: torch.Tensor


def _check(steps, bound, eot) -> tuple[int, float, int]:
    """steps >= 1 (iterate 0 is the clean image), bound > 0, eot >= 1, or an OptionError naming the argument."""
    return check_int("steps", steps), check_float("bound", bound, low=0.0, low_open=True), check_int("eot", eot)


def _iterate(defended, x, y, sample_ids, *, name: str, start: torch.Tensor, start_measure: torch.Tensor,
             step: Callable, steps: int, eot: int, loss: str, target, seed: int, noise_seed, chunk_size,
             progress) -> UnrestrictedResult:
    """The loop every unrestricted attack shares (see the module docstring). step(x_adv, grad, s) -> (next iterate,
    its measure (B,))."""
    b = x.shape[0]
    preds = torch.empty((steps + 1, b), dtype=torch.int64)
    losses = torch.empty((steps + 1, b), dtype=torch.float64)
    x_adv, measure = start, start_measure
    best_x, best_m = x_adv.clone(), measure.clone()
    best_loss = torch.full((b,), float("-inf"), dtype=torch.float64)
    for s in range(steps + 1):
        last = s == steps
        grad, logits, lv = eot_gradient(defended, x_adv, y, sample_ids, seed=attack_seed(seed, noise_seed, name, s),
                                        eot=eot, loss=loss, target=target, chunk_size=chunk_size, need_grad=not last)
        preds[s], losses[s] = logits.argmax(1).cpu(), lv.double().cpu()
        if s >= 1:
            better = losses[s] > best_loss
            best_loss[better] = losses[s][better]
            dev = better.to(x.device)
            best_x[dev], best_m[dev] = x_adv[dev], measure[dev]
        if not last:
            x_adv, measure = step(x_adv, grad, s)
        if progress is not None:
            progress(1)
    return UnrestrictedResult(best_x, best_m.double().cpu(), preds, losses)


def lf_attack(defended, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *, lpips: LPIPS, bound: float,
              steps: int, step_size: float, factor: int = 4, eot: int = 1, loss: str = "cw",
              target: torch.Tensor | None = None, seed: int = 0, noise_seed: int | None = None,
              chunk_size: int | None = None, progress=None) -> UnrestrictedResult:
    """The low-frequency attack (see the module docstring). x: (B, C, H, W) in [0, 1]; y: (B,) int64; sample_ids:
    (B,) global indices; bound: LPIPS distance; step_size: v's signed step in pixel units; factor: the coarse grid's
    downsampling factor (>= 1)."""
    steps, bound, eot = _check(steps, bound, eot)
    factor = check_int("factor", factor)
    x = x.detach()
    size = x.shape[2:]
    v = torch.zeros((*x.shape[:2], -(-size[0] // factor), -(-size[1] // factor)), dtype=x.dtype, device=x.device)

    def image(p):
        return (x + F.interpolate(p, size=size, mode="bilinear", align_corners=False)).clamp(0.0, 1.0)

    def step(x_adv, grad, s):
        nonlocal v
        vg = v.clone().requires_grad_(True)
        with torch.enable_grad():
            g_v = torch.autograd.grad(image(vg), vg, grad_outputs=grad)[0]
        v = v + step_size * g_v.sign()
        out, d, lam = lpips_project(lpips, x, image(v), bound)
        v = v * lam.reshape(-1, 1, 1, 1).to(v.dtype)
        return out, d

    return _iterate(defended, x, y, sample_ids, name="lf", start=x.clone(), start_measure=torch.zeros(x.shape[0]),
                    step=step, steps=steps, eot=eot, loss=loss, target=target, seed=seed, noise_seed=noise_seed,
                    chunk_size=chunk_size, progress=progress)


def _cg_direction(lpips: LPIPS, x: torch.Tensor, g: torch.Tensor, iters: int, h: float) -> torch.Tensor:
    """Approximately (J^T J)^{-1} g per sample by conjugate gradients, J the Jacobian of ``lpips.features`` at x and
    ``J^T J p`` by a finite difference of the features followed by their VJP (Laidlaw et al.'s
    ``FirstOrderStepPerceptualAttack``)."""
    dims = (-1, *[1] * (x.dim() - 1))
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        phi = lpips.features(xg)

    def jtj(p):
        with torch.no_grad():
            jp = (lpips.features(x + h * p) - phi.detach()) / h
        return torch.autograd.grad(phi, xg, grad_outputs=jp, retain_graph=True)[0]

    def dot(a, b):
        return (a * b).flatten(1).sum(1)

    d = torch.zeros_like(g)
    r = g.clone()
    p = r.clone()
    rr = dot(r, r)
    for _ in range(iters):
        ap = jtj(p)
        alpha = rr / dot(p, ap).clamp_min(1e-30)
        d = d + alpha.reshape(dims) * p
        r = r - alpha.reshape(dims) * ap
        rr_new = dot(r, r)
        p = r + (rr_new / rr.clamp_min(1e-30)).reshape(dims) * p
        rr = rr_new
    return d.detach()


def ppgd_attack(defended, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *, lpips: LPIPS, bound: float,
                steps: int, eot: int = 1, loss: str = "cw", target: torch.Tensor | None = None, seed: int = 0,
                noise_seed: int | None = None, cg_steps: int = 5, h: float = 1e-3, chunk_size: int | None = None,
                progress=None) -> UnrestrictedResult:
    """Perceptual PGD (see the module docstring). bound: the LPIPS distance; its step is 2 bound / steps."""
    steps, bound, eot = _check(steps, bound, eot)
    x = x.detach()
    dims = (-1, *[1] * (x.dim() - 1))
    noise = []
    for i in sample_ids.tolist():
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "ppgd-start", i))
        noise.append(torch.randn(x.shape[1:], generator=gen, dtype=torch.float64) * 0.01)
    start, d0, _ = lpips_project(lpips, x, (x + torch.stack(noise).to(x)).clamp(0.0, 1.0), bound)
    length = 2.0 * bound / steps

    def step(x_adv, grad, s):
        direction = _cg_direction(lpips, x_adv, grad, cg_steps, h)
        with torch.no_grad():
            jd = ((lpips.features(x_adv + h * direction) - lpips.features(x_adv)) / h).norm(dim=1)
            scale = torch.where(jd > 0, length / jd.clamp_min(1e-30), torch.zeros_like(jd))
            moved = (x_adv + scale.reshape(dims) * direction).clamp(0.0, 1.0)
        out, d, _ = lpips_project(lpips, x, moved, bound)
        return out, d

    return _iterate(defended, x, y, sample_ids, name="ppgd", start=start, start_measure=d0, step=step, steps=steps,
                    eot=eot, loss=loss, target=target, seed=seed, noise_seed=noise_seed, chunk_size=chunk_size,
                    progress=progress)


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) sampled bilinearly at the identity grid plus flow (B, H, W, 2) (``grid_sample`` units,
    align_corners=False, border padding): StAdv's transformation."""
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid + flow, mode="bilinear", padding_mode="border", align_corners=False)


def flow_smoothness(flow: torch.Tensor) -> torch.Tensor:
    """Xiao et al.'s L_flow (B,): the sum over horizontally and vertically neighbouring pixels of
    sqrt(||f_p - f_q||^2 + 1e-8). flow: (B, H, W, 2)."""
    dh = (flow[:, :, 1:] - flow[:, :, :-1]).square().sum(-1)
    dv = (flow[:, 1:] - flow[:, :-1]).square().sum(-1)
    return (dh + 1e-8).sqrt().flatten(1).sum(1) + (dv + 1e-8).sqrt().flatten(1).sum(1)


def stadv_attack(defended, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *, bound: float, steps: int,
                 step_size: float | None = None, smoothness: float = 0.05, eot: int = 1, loss: str = "cw",
                 target: torch.Tensor | None = None, seed: int = 0, noise_seed: int | None = None,
                 chunk_size: int | None = None, progress=None) -> UnrestrictedResult:
    """StAdv (see the module docstring). bound: |f|_inf in grid_sample units; step_size: default 2.5 bound / steps
    (Madry et al.'s rule); smoothness: the weight of L_flow (>= 0)."""
    steps, bound, eot = _check(steps, bound, eot)
    smoothness = check_float("smoothness", smoothness, low=0.0)
    x = x.detach()
    alpha = 2.5 * bound / steps if step_size is None else float(step_size)
    flow = torch.zeros((x.shape[0], *x.shape[2:], 2), dtype=x.dtype, device=x.device)
    # the largest value of the flow's dtype that is <= bound (float32(0.05) is above 0.05)
    limit = torch.tensor(bound, dtype=x.dtype)
    if float(limit) > bound:
        limit = torch.nextafter(limit, torch.zeros_like(limit))
    limit = float(limit)

    def step(x_adv, grad, s):
        nonlocal flow
        fg = flow.clone().requires_grad_(True)
        with torch.enable_grad():
            objective = (warp(x, fg) * grad).sum() - smoothness * flow_smoothness(fg).sum()
            g_f = torch.autograd.grad(objective, fg)[0]
        flow = (flow + alpha * g_f.sign()).clamp(-limit, limit)
        with torch.no_grad():
            return warp(x, flow), flow.abs().flatten(1).amax(1)

    with torch.no_grad():
        start = warp(x, flow)
    return _iterate(defended, x, y, sample_ids, name="stadv", start=start, start_measure=torch.zeros(x.shape[0]),
                    step=step, steps=steps, eot=eot, loss=loss, target=target, seed=seed, noise_seed=noise_seed,
                    chunk_size=chunk_size, progress=progress)
