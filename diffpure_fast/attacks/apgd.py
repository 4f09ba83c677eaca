"""APGD with EOT (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, Algorithm 1), against a randomized ``DefendedClassifier``.

The iteration is AutoAttack's (``autopgd_base.APGDAttack.attack_single_run``, fra31/auto-attack) step for step:
start ``x + eps * t / ||t||`` (t uniform in [-1, 1]^d for L-inf, Gaussian for L2), initial step size ``2 eps``,
momentum ``x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1}))`` with ``z = P(x_k + eta sign(grad))`` and
``a = 0.75`` (1 on the first step), and checkpoints after ``0.22 n``, then every ``max(k - 0.03 n, 0.06 n)``
iterations, where the step size is halved (and the iterate reset to the best one) if fewer than ``rho k`` of the
last k steps raised the loss, or if the best loss did not improve since the last checkpoint without a reduction.

What differs for a randomized defense, by design (our reading; AutoAttack's pull requests #104/#105 name the
problem): the gradient is the mean over ``eot`` purification draws per iterate (batched, one noise id per copy,
``pgd.eot_gradient``), and the loss that decides the best iterate and the checkpoints, and the prediction recorded
per iterate, are those of the EOT estimate (mean loss, argmax of the mean logits over the ``eot`` draws), not of
the last single draw. The run returns its best iterate for every sample; it never falls back to the clean input
(AutoAttack's ``perturb`` returns x unless one noisy evaluation says the iterate fools the model). With ``eot=1``
on a deterministic model the trajectory equals AutoAttack's (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._validate import OptionError, check_choice, check_float, check_int
from .pgd import EOT_REDUCTIONS, LOSSES, NORMS, TARGETED_LOSSES, eot_gradient
from .randomness import attack_seed, derive_seed

__all__ = ["APGDResult", "GradientOracle", "apgd_checkpoints", "apgd_eot", "apgd_start", "eot_oracle"]

# What APGD asks at each iterate k: (x_k (B, C, H, W), k) -> (gradient of the loss to maximise (B, C, H, W), the
# logits whose argmax is the iterate's prediction (B, K), the loss (B,) that decides the best iterate). The default is
# the EOT gradient (``eot_oracle``); DiffAttack and DiffHammer give their own.
GradientOracle = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class APGDResult:
    """One APGD run on a batch of B.

    x_best: (B, C, H, W) the iterate of highest EOT loss (start point included); loss_best: (B,) its loss;
    pred_trace: (S + 1, B) int64, the EOT prediction (argmax of the mean logits) at each iterate (0: the start);
    loss_trace: (S + 1, B) float64, the EOT loss there; step_size: (B,) the final step size.
    """

    x_best: torch.Tensor
    loss_best: torch.Tensor
    pred_trace: torch.Tensor
    loss_trace: torch.Tensor
    step_size: torch.Tensor


def apgd_checkpoints(steps: int) -> tuple[int, int, int]:
    """(first checkpoint length, minimal length, decrement) of AutoAttack's schedule for ``steps`` iterations:
    ``max(int(0.22 n), 1)``, ``max(int(0.06 n), 1)``, ``max(int(0.03 n), 1)``."""
    return max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)


def _normalize(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.flatten(1)
    t = flat.abs().amax(1) if norm == "linf" else flat.pow(2).sum(1).sqrt()
    return v / (t.reshape(-1, *[1] * (v.dim() - 1)) + 1e-12)


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).pow(2).sum(1).sqrt().reshape(-1, *[1] * (v.dim() - 1))


def _project(z: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """AutoAttack's projection onto the eps-ball around x and [0, 1] (its L2 form, ``1e-12`` included)."""
    if norm == "linf":
        return torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
    d = z - x
    return torch.clamp(x + _normalize(d, "l2") * torch.clamp(_l2(d), max=eps), 0.0, 1.0)


def apgd_start(x: torch.Tensor, sample_ids: torch.Tensor, *, norm: str, eps: float, seed: int) -> torch.Tensor:
    """AutoAttack's random start ``clip(x + eps t / ||t||, 0, 1)``, t drawn per sample from a generator seeded by
    (seed, global index): uniform in [-1, 1] (L-inf, so the largest coordinate moves by exactly eps) or Gaussian
    (L2, so the start lies on the sphere)."""
    t = []
    for i in sample_ids.tolist():
        g = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "apgd-start", i))
        t.append(torch.rand(x.shape[1:], generator=g, dtype=torch.float64) * 2 - 1 if norm == "linf"
                 else torch.randn(x.shape[1:], generator=g, dtype=torch.float64))
    t = torch.stack(t).to(x.dtype).to(x.device)
    return (x + eps * _normalize(t, norm)).clamp(0.0, 1.0)


def eot_oracle(defended, y: torch.Tensor, sample_ids: torch.Tensor, *, seed: int, noise_seed: int | None = None,
               **options) -> GradientOracle:
    """APGD's default oracle: ``pgd.eot_gradient`` at iterate k with purifier seed ``derive_seed(seed, "apgd", k)``
    (or ``noise_seed`` at every iterate: fixed noise); options: eot, loss, target, eot_reduce, chunk_size."""
    def oracle(x_k: torch.Tensor, k: int):
        return eot_gradient(defended, x_k, y, sample_ids, seed=attack_seed(seed, noise_seed, "apgd", k), **options)
    return oracle


def apgd_eot(defended, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *, eps: float, steps: int = 100,
             norm: str = "linf", loss: str = "ce", target: torch.Tensor | None = None, eot: int = 1, rho: float = 0.75,
             seed: int = 0, noise_seed: int | None = None, eot_reduce: str = "loss", chunk_size: int | None = None,
             x_init: torch.Tensor | None = None, oracle: GradientOracle | None = None,
             progress: Callable[[int], None] | None = None) -> APGDResult:
    """One APGD-EOT run (one restart) against a ``DefendedClassifier`` (see the module docstring).

    Args:
        x: (B, C, H, W) clean images in [0, 1]; y: (B,) int64 labels; sample_ids: (B,) int64 global indices (the
            noise ids and the start derive from them, so a sample's run does not depend on its batch).
        eps: radius in [0, 1] pixel units; steps: iterations (AutoAttack: 100); norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"``, ``"dlr"``, ``"cw"`` or ``"dlr-targeted"`` (then ``target``: (B,) int64 classes).
        eot: purification draws per iterate; rho: the checkpoints' oscillation threshold (AutoAttack: 0.75).
        seed: the run's seed: iterate k draws its noise with ``derive_seed(seed, "apgd", k)``, the start with
            ``derive_seed(seed, "apgd-start", index)``; give each restart and each loss its own seed.
        noise_seed: fixed noise: every iterate's EOT draws use this purifier seed (None: fresh per iterate).
        x_init: (B, C, H, W) a start point instead of the random one (inside the ball; for tests and warm starts).
        oracle: the gradient at each iterate instead of the EOT gradient (``GradientOracle``; loss, target, eot,
            eot_reduce, noise_seed and chunk_size are then the oracle's business).
        progress: called with 1 after each gradient evaluation (steps + 1 in all).
    Returns:
        an ``APGDResult``; ``x_best`` lies in the eps-ball and in [0, 1].
    """
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, LOSSES + TARGETED_LOSSES)
    check_choice("eot_reduce", eot_reduce, EOT_REDUCTIONS)
    steps, eot = check_int("steps", steps, low=0), check_int("eot", eot, low=1)
    eps = check_float("eps", eps, low=0.0)
    rho = check_float("rho", rho, low=0.0, high=1.0, low_open=True)
    x = x.detach()
    b, dims = x.shape[0], [1] * (x.dim() - 1)
    if x_init is None:
        x_adv = apgd_start(x, sample_ids, norm=norm, eps=eps, seed=seed)
    else:
        if x_init.shape != x.shape:
            raise OptionError("x_init", f"expected shape {tuple(x.shape)} (x's), got {tuple(x_init.shape)}")
        x_adv = x_init.detach().clone().clamp(0.0, 1.0)
    if oracle is None:
        oracle = eot_oracle(defended, y, sample_ids, seed=seed, noise_seed=noise_seed, eot=eot, loss=loss,
                            target=target, eot_reduce=eot_reduce, chunk_size=chunk_size)

    def evaluate(x_k: torch.Tensor, k: int):
        grad, mean_logits, loss_k = oracle(x_k, k)
        if progress is not None:
            progress(1)
        return grad, mean_logits.argmax(1), loss_k.detach()

    preds = torch.empty((steps + 1, b), dtype=torch.int64)
    loss_trace = torch.empty((steps + 1, b), dtype=torch.float64)
    grad, pred, loss_k = evaluate(x_adv, 0)
    preds[0], loss_trace[0] = pred.cpu(), loss_k.double().cpu()
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss_k.clone()

    step_size = torch.full((b, *dims), 2.0 * eps, dtype=x.dtype, device=x.device)
    x_old = x_adv.clone()
    k, n_min, decrement = apgd_checkpoints(steps)
    since_check = 0
    loss_steps = torch.zeros((steps, b), dtype=loss_k.dtype, device=loss_k.device)
    best_at_check = loss_best.clone()
    reduced_at_check = torch.ones_like(loss_best, dtype=torch.bool)
    for i in range(steps):
        # the step with momentum (AutoAttack: a = 0.75, none on the first step)
        with torch.no_grad():
            momentum = x_adv - x_old
            x_old = x_adv
            a = 0.75 if i > 0 else 1.0
            direction = grad.sign() if norm == "linf" else _normalize(grad, "l2")
            z = _project(x_adv + step_size * direction, x, norm, eps)
            x_adv = _project(x_adv + (z - x_adv) * a + momentum * (1 - a), x, norm, eps)
        grad, pred, loss_k = evaluate(x_adv, i + 1)
        preds[i + 1], loss_trace[i + 1] = pred.cpu(), loss_k.double().cpu()
        loss_steps[i] = loss_k
        better = loss_k > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss_k[better]
        since_check += 1
        if since_check == k:
            # checkpoint: halve the step where the loss oscillated (rose in at most rho k of the last k steps) or
            # where the best loss did not improve since the last checkpoint and the step was not reduced then
            rises = sum((loss_steps[i - j] > loss_steps[i - j - 1]).to(loss_k.dtype) for j in range(k))
            reduce = (rises <= k * rho) | (~reduced_at_check & (best_at_check >= loss_best))
            reduced_at_check, best_at_check = reduce, loss_best.clone()
            if bool(reduce.any()):
                step_size[reduce] /= 2.0
                x_adv = x_adv.clone()
                x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
            k = max(k - decrement, n_min)
            since_check = 0
    return APGDResult(x_best=x_best, loss_best=loss_best.double().cpu(), pred_trace=preds, loss_trace=loss_trace,
                      step_size=step_size.flatten().cpu())
