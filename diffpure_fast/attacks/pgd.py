"""L-infinity PGD (Madry et al. 2018) with expectation over transformation (EOT, Athalye et al. 2018).

The attacked model is ``forward(x, draw) -> logits``: ``draw`` numbers the random draw (for a purifier, the noise
seed), so the attack is reproducible and an EOT average uses ``eot`` distinct draws per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validate import OptionError, check_float, check_int

__all__ = ["EOT_REDUCTIONS", "LOSSES", "NORMS", "TARGETED_LOSSES", "PGDResult", "attack_loss", "eot_gradient",
           "pgd_eot", "pgd_linf", "ranked_targets"]


def pgd_linf(forward: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
             eps: float, steps: int, step_size: float | None = None, eot: int = 1, random_start: bool = True,
             seed: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy, with the EOT mean of ``eot`` gradients per step.

    Args:
        forward: ``forward(x_adv, draw)`` -> logits (B, K); must be differentiable in x_adv.
        x: (B, C, H, W) clean images in [0, 1]; y: (B,) int64 labels.
        eps: the L-inf radius (in [0, 1] units); step_size: defaults to 2.5 eps / steps (Madry et al.).
        eot: gradient draws averaged per step; the draw index of step s, sample e is ``s * eot + e``.
        seed: seeds the random start (a private generator: torch's global RNG is untouched).
        progress: called with the number of gradient evaluations just done (e.g. a tqdm ``update``).
    Returns:
        (B, C, H, W) adversarial images in [0, 1] with ``|x_adv - x|_inf <= eps``.
    """
    eps = check_float("eps", eps, low=0.0)
    steps, eot = check_int("steps", steps, low=0), check_int("eot", eot)
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    x = x.detach()
    x_adv = x.clone()
    if random_start and eps > 0:
        g = torch.Generator(device="cpu").manual_seed(seed)
        x_adv = x_adv + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1).to(x.device) * eps
        x_adv = x_adv.clamp(0.0, 1.0)
    for s in range(steps):
        grad = torch.zeros_like(x)
        for e in range(eot):
            xg = x_adv.clone().requires_grad_(True)
            loss = F.cross_entropy(forward(xg, s * eot + e), y, reduction="sum")
            grad += torch.autograd.grad(loss, xg)[0]
            if progress is not None:
                progress(1)
        x_adv = x_adv + alpha * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return x_adv


# ---------------------------------------------------------------------------------------------------------------
# PGD-EOT against a randomized defense, with batched EOT (the harness's attack).

LOSSES = ("ce", "dlr", "cw")
TARGETED_LOSSES = ("dlr-targeted", "cw-targeted")
NORMS = ("linf", "l2")
EOT_REDUCTIONS = ("loss", "logits")


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (B,) that the attack *maximises* (higher = closer to misclassification).

    ``ce``: cross-entropy; ``cw``: the CW margin ``max_{k != y} z_k - z_y``; ``dlr``: Croce & Hein's difference of
    logits ratio ``-(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3 + 1e-12)`` (needs at least 3 classes);
    ``dlr-targeted``: their targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` towards ``target``
    (needs at least 4 classes; Croce & Hein, ICML 2020, eq. 7; ``autopgd_base.dlr_loss_targeted``);
    ``cw-targeted``: the targeted CW margin ``z_t - max_{k != t} z_k`` (Carlini & Wagner 2017, f6).
    logits: (B, K); y, target: (B,) int64.
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    z_y = logits.gather(1, y[:, None])[:, 0]
    if loss in TARGETED_LOSSES and target is None:
        raise ValueError(f"target: loss {loss!r} needs the target classes, got None")
    if loss == "cw-targeted":
        z_t = logits.gather(1, target[:, None])[:, 0]
        return z_t - logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")).amax(1)
    if loss == "dlr-targeted":
        if logits.shape[1] < 4:
            raise ValueError(f"loss: 'dlr-targeted' needs at least 4 classes, got {logits.shape[1]}")
        s = logits.sort(1, descending=True).values
        return (logits.gather(1, target[:, None])[:, 0] - z_y) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    if loss == "cw":
        return other - z_y
    if loss == "dlr":
        if logits.shape[1] < 3:
            raise ValueError(f"loss: 'dlr' needs at least 3 classes, got {logits.shape[1]}")
        s = logits.sort(1, descending=True).values
        return (other - z_y) / (s[:, 0] - s[:, 2] + 1e-12)
    raise ValueError(f"loss: expected one of {(*LOSSES, *TARGETED_LOSSES)}, got {loss!r}")


def _copy_sum(per_copy: torch.Tensor, eot: int) -> torch.Tensor:
    """Sum of copy-major (eot * B, ...) over the copies, in the fixed order j = 0, 1, ... (both EOT forms use this,
    so their float sums round identically)."""
    b = per_copy.shape[0] // eot
    total = per_copy[:b].clone()
    for j in range(1, eot):
        total += per_copy[j * b:(j + 1) * b]
    return total


def eot_copies(y: torch.Tensor, target: torch.Tensor | None, sample_ids: torch.Tensor, eot: int):
    """The labels, targets (or None) and noise ids of ``eot`` copies of a batch laid out copy-major (``randomness.
    eot_noise_ids``): ((eot * B,), (eot * B,) or None, (eot * B,) on y's device)."""
    from .randomness import eot_noise_ids

    return (y.repeat(eot), None if target is None else target.repeat(eot),
            eot_noise_ids(sample_ids, eot).to(y.device))


def _chunks(n: int, chunk: int | None):
    step = n if chunk is None else chunk
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def eot_gradient(defended, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *, seed: int, eot: int,
                 loss: str = "ce", eot_reduce: str = "loss", chunk_size: int | None = None, batched: bool = True,
                 need_grad: bool = True, target: torch.Tensor | None = None):
    """The EOT gradient at x: the mean over ``eot`` purification draws of d loss / d x.

    Batched (default): the eot copies of the batch go through the purifier together, as one batch of eot * B (in
    chunks of at most ``chunk_size`` copies, to fit memory), copy j of sample b with noise id
    ``sample_ids[b] * eot + j``. Looped (``batched=False``): one purification of B per copy with the same ids. Both
    sum the per-copy gradients in the same order, so they are bit-identical whenever the purifier and classifier
    are batch-invariant (per-sample results not depending on the batch; true for the fused step and its noise).

    eot_reduce: ``"loss"`` averages the losses of the copies (the gradient of the mean loss; PGD-EOT, AutoAttack);
    ``"logits"`` takes the loss of the mean logits (DiffPure's BPDA+EOT), computed with a no-grad first pass.

    Args: defended: a ``DefendedClassifier``; x: (B, C, H, W) in [0, 1]; y: (B,) int64; sample_ids: (B,) int64
    global indices; seed: the purifier seed of this step; target: (B,) int64 target classes of a targeted loss.
    Returns: (grad (B, C, H, W) or None without need_grad, mean logits (B, K), loss (B,) of the EOT estimate).
    """
    if loss not in LOSSES + TARGETED_LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES + TARGETED_LOSSES}, got {loss!r}")
    if (target is not None) != (loss in TARGETED_LOSSES):
        raise ValueError(f"target: given exactly when the loss is targeted {TARGETED_LOSSES}, got loss={loss!r} "
                         f"with target {'given' if target is not None else 'None'}")
    if eot_reduce not in EOT_REDUCTIONS:
        raise ValueError(f"eot_reduce: expected one of {EOT_REDUCTIONS}, got {eot_reduce!r}")
    b = x.shape[0]
    x = x.detach()
    y_rep, t_rep, ids = eot_copies(y, target, sample_ids, eot)

    def copy_loss(logits, c0, c1):
        return attack_loss(logits, y_rep[c0:c1], loss, None if t_rep is None else t_rep[c0:c1])

    if batched:
        x_rep = x.repeat(eot, 1, 1, 1)
        spans = _chunks(eot * b, chunk_size)
    else:
        spans = [(j * b, (j + 1) * b) for j in range(eot)]

    def inputs(c0, c1):
        return x_rep[c0:c1] if batched else x

    def run(c0, c1, grad_out=None):
        """logits of copies c0..c1 and, with grad_out, their per-copy input gradients."""
        xc = inputs(c0, c1).clone().requires_grad_(grad_out is not None)
        with torch.set_grad_enabled(grad_out is not None):
            logits = defended.logits(xc, seed=seed, noise_ids=ids[c0:c1])
            if grad_out is None:
                return logits.detach(), None
            target = grad_out(logits, c0, c1)
            g = torch.autograd.grad(logits, xc, grad_outputs=target)[0] if target is not None else None
        return logits.detach(), g

    copy_grads = torch.empty((eot * b, *x.shape[1:]), dtype=x.dtype, device=x.device) if need_grad else None
    copy_logits = [None] * len(spans)
    if eot_reduce == "loss" or not need_grad:
        def d_loss(logits, c0, c1):
            # d (sum of per-copy losses) / d logits; the 1/eot of the mean is applied once, after the copy sum
            with torch.enable_grad():
                lg = logits if logits.requires_grad else logits.detach().requires_grad_(True)
                return torch.autograd.grad(copy_loss(lg, c0, c1).sum(), lg, retain_graph=True)[0]
        for k, (c0, c1) in enumerate(spans):
            copy_logits[k], g = run(c0, c1, d_loss if need_grad else None)
            if need_grad:
                copy_grads[c0:c1] = g
        logits_all = torch.cat(copy_logits)
        mean_logits = _copy_sum(logits_all, eot) / eot
        loss_value = _copy_sum(copy_loss(logits_all, 0, eot * b), eot) / eot
        grad = _copy_sum(copy_grads, eot) / eot if need_grad else None
        return grad, mean_logits, loss_value

    # eot_reduce == "logits": the loss of the mean logits; pass 1 finds d loss / d mean logits, pass 2 pulls it
    # back through each copy (d mean / d logits_j = 1 / eot).
    with torch.no_grad():
        logits_all = torch.cat([run(c0, c1)[0] for c0, c1 in spans])
    mean_logits = (_copy_sum(logits_all, eot) / eot).requires_grad_(True)
    with torch.enable_grad():
        loss_value = attack_loss(mean_logits, y, loss, target)
        g_mean = torch.autograd.grad(loss_value.sum(), mean_logits)[0]
    g_rep = g_mean.repeat(eot, 1)
    for c0, c1 in spans:
        copy_grads[c0:c1] = run(c0, c1, lambda logits, a, c: g_rep[a:c])[1]
    return _copy_sum(copy_grads, eot) / eot, mean_logits.detach(), loss_value.detach()


def ranked_targets(defended, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *, seed: int, eot: int,
                   n_targets: int, chunk_size: int | None = None) -> torch.Tensor:
    """(B, n_targets) int64: the classes other than y in decreasing order of the clean EOT mean logits (``eot``
    draws with purifier seed ``seed``), the targets of a targeted attack over the top-k classes. AutoAttack ranks one
    noisy output and attacks only correctly classified points, whose top class is y; every sample is attacked here,
    so y itself is taken out of the ranking (our reading). n_targets above K - 1 is an error, never capped."""
    n_targets = check_int("n_targets", n_targets)
    _, mean_logits, _ = eot_gradient(defended, x, y, sample_ids, seed=seed, eot=eot, need_grad=False,
                                     chunk_size=chunk_size)
    k = mean_logits.shape[1]
    if n_targets > k - 1:
        raise OptionError("n_targets", f"{n_targets} target classes asked for, but the classifier has {k} classes, "
                                       f"so at most K - 1 = {k - 1} targets exist")
    ranked = mean_logits.masked_fill(F.one_hot(y, k).bool(), float("-inf"))
    return ranked.argsort(1, descending=True)[:, :n_targets]


def _random_start(x: torch.Tensor, sample_ids: torch.Tensor, *, norm: str, eps: float, seed: int,
                  restart: int) -> torch.Tensor:
    """A start point in the eps-ball per sample, drawn from a generator seeded by (seed, restart, global index)."""
    from .randomness import derive_seed

    noise = []
    for i in sample_ids.tolist():
        g = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "start", restart, i))
        if norm == "linf":
            noise.append((torch.rand(x.shape[1:], generator=g, dtype=torch.float64) * 2 - 1) * eps)
        else:
            d = torch.randn(x.shape[1:], generator=g, dtype=torch.float64)
            r = torch.rand((), generator=g, dtype=torch.float64)
            noise.append(d / d.norm().clamp_min(1e-12) * eps * r)
    return (x + torch.stack(noise).to(x.dtype).to(x.device)).clamp(0.0, 1.0)


def _project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        x_adv = x + delta * (eps / n).clamp(max=1.0).reshape(-1, *[1] * (x.dim() - 1))
    # x is in [0, 1], so clamping after the projection moves every coordinate towards x: the norm stays <= eps
    return x_adv.clamp(0.0, 1.0)


@dataclass
class PGDResult:
    """Per-sample outcome of ``pgd_eot`` for a batch of B.

    x_adv: (B, C, H, W) in [0, 1] within the eps-ball; pred_trace: (R, S + 1, B) int64, the EOT prediction (argmax
    of the mean logits) at each iterate of each restart (iterate 0 is the start, S the final one); loss_trace:
    (R, S + 1, B) the EOT loss there; restart: (B,) the restart whose final iterate was kept; finals:
    (R, B, C, H, W) every restart's final iterate (the harness chooses among them with fresh noise,
    ``attacks.selection``).
    """

    x_adv: torch.Tensor
    pred_trace: torch.Tensor
    loss_trace: torch.Tensor
    restart: torch.Tensor
    finals: torch.Tensor


def pgd_eot(defended, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *, eps: float, steps: int,
            norm: str = "linf", step_size: float | None = None, random_start: bool = True, restarts: int = 1,
            loss: str = "ce", target: torch.Tensor | None = None, eot: int = 1, eot_reduce: str = "loss", seed: int = 0,
            noise_seed: int | None = None, chunk_size: int | None = None, batched: bool = True,
            progress: Callable[[int], None] | None = None) -> PGDResult:
    """PGD with EOT (Madry et al. 2018; Athalye et al. 2018) against a ``DefendedClassifier``, L-inf or L2.

    Each step takes the EOT gradient of ``eot`` fresh purification draws (seed ``derive_seed(seed, 'attack',
    restart, step)``, or ``noise_seed`` at every step: fixed noise; noise ids from the global ``sample_ids``, see
    ``randomness``) and moves by ``step_size``
    along its sign (L-inf) or its unit direction (L2), then projects onto the eps-ball and [0, 1]. After the last
    step one more EOT forward scores the final iterate; with several restarts each sample keeps the restart whose
    final iterate fooled the EOT prediction, else the one of highest EOT loss. The gradient is the purifier's:
    whatever ``grad_mode`` it was built with (full, adjoint, bpda, surrogate).

    Args:
        x: (B, C, H, W) clean images in [0, 1]; y: (B,) int64 labels; sample_ids: (B,) int64 global indices.
        eps: radius in [0, 1] pixel units; steps: >= 0; step_size: default 2.5 eps / steps (Madry et al.).
        loss: ``"ce"``, ``"dlr"``, ``"cw"``, or a targeted loss (``"dlr-targeted"``, ``"cw-targeted"``) with
            ``target`` (B,) int64; eot: draws per step; eot_reduce: see ``eot_gradient``.
        noise_seed: fixed noise (one purifier seed for every step and restart), or None (a fresh seed per step).
        chunk_size: at most this many image copies per purifier call (None: all eot * B at once).
        progress: called with the number of steps just done (S + 1 per restart, the final scoring included).
    """
    from .randomness import attack_seed

    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    steps, restarts, eot = (check_int(n, v, low=lo) for n, v, lo in (("steps", steps, 0), ("restarts", restarts, 1),
                                                                       ("eot", eot, 1)))
    eps = check_float("eps", eps, low=0.0)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
    alpha = (2.5 * eps / max(steps, 1)) if step_size is None else float(step_size)
    x = x.detach()
    b = x.shape[0]
    preds = torch.empty((restarts, steps + 1, b), dtype=torch.int64)
    losses = torch.empty((restarts, steps + 1, b), dtype=torch.float64)
    finals = []
    opts = dict(eot=eot, loss=loss, target=target, eot_reduce=eot_reduce, chunk_size=chunk_size, batched=batched)
    for r in range(restarts):
        x_adv = _random_start(x, sample_ids, norm=norm, eps=eps, seed=seed, restart=r) if (random_start and eps > 0) \
            else x.clone()
        for s in range(steps + 1):
            last = s == steps
            grad, mean_logits, lv = eot_gradient(defended, x_adv, y, sample_ids,
                                                 seed=attack_seed(seed, noise_seed, "attack", r, s),
                                                 need_grad=not last, **opts)
            preds[r, s] = mean_logits.argmax(1).cpu()
            losses[r, s] = lv.double().cpu()
            if not last:
                if norm == "linf":
                    direction = grad.sign()
                else:
                    direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (x.dim() - 1))
                x_adv = _project(x_adv + alpha * direction, x, norm, eps).detach()
            if progress is not None:
                progress(1)
        finals.append(x_adv)
    # keep, per sample, a fooling restart if there is one, else the highest final loss
    final_wrong = (preds[:, -1] != y.cpu()[None]).double()
    score = final_wrong * 1e300 + torch.nan_to_num(losses[:, -1], nan=-1e300).clamp(-1e299, 1e299)
    chosen = score.argmax(0)
    stacked = torch.stack(finals)
    x_best = stacked[chosen.to(x.device), torch.arange(b, device=x.device)]
    return PGDResult(x_adv=x_best, pred_trace=preds, loss_trace=losses, restart=chosen, finals=stacked)
