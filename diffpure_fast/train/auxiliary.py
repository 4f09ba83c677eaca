"""Adversarial training of AGDM's auxiliary network (``diffpure_fast.methods.agdm``), TRADES-like.

[paper] ``min_phi E[ L(c_phi(x), y) + lambda max_{||delta|| <= eps} D(c_phi(x), c_phi(x + delta)) ]``, with L the
cross-entropy and D the distance the guidance uses; the architecture, eps and lambda are not stated (ours below).
The inner maximisation is L-inf PGD on D from a small random start (TRADES' 0.001 N(0, 1)), projected to the ball
and to the image range; the adversarial point is then a constant of the outer step (as in TRADES).

[ours] Gaussian-noise augmentation: c_phi sees the noisy states x_t of the reverse chain (levels below round(N
t*)), not clean images; with ``noise_prob`` > 0, that fraction of each batch is replaced by
``sqrt(abar_l) x + sqrt(1 - abar_l) z`` at a uniform level l < ``noise_level`` (in [-1, 1] units, mapped back to the
network's [0, 1]) before the inner maximisation.

Reproducible: every random draw (initialisation, data order, noise, PGD starts) comes from generators seeded with
``seed``; with the same thread count on the same machine, the same seed gives the same weights bit for bit. Torch's
global RNG is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import pgd_linf
from ..schedule import DIFFPURE_SCHEDULE, VPSchedule

__all__ = ["AuxTrainConfig", "auxiliary_accuracy", "init_auxiliary", "noise_augment", "noisy_accuracy",
           "train_auxiliary", "trades_inner_max"]

TRAIN_DISTANCES = ("feature_mse", "kl")


@dataclass(frozen=True)
class AuxTrainConfig:
    epochs: int = 40
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    eps: float = 0.1               # L-inf radius of the inner maximisation, in [0, 1] image units
    pgd_steps: int = 7
    pgd_step_size: float | None = None   # None: 2.5 eps / pgd_steps
    lam: float = 6.0               # TRADES' beta (its CIFAR-10 default)
    distance: str = "feature_mse"  # the D of the inner maximisation and the robust term
    noise_prob: float = 0.5        # fraction of each batch replaced by a noised copy (0: no augmentation)
    noise_level: int = 70          # noised copies at levels 0 .. noise_level - 1 (AGDM's t* = 0.07 chain)
    seed: int = 0

    def __post_init__(self):
        if self.distance not in TRAIN_DISTANCES:
            raise ValueError(f"distance: expected one of {TRAIN_DISTANCES}, got {self.distance!r}")
        for name in ("epochs", "batch", "noise_level"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.pgd_steps, int) or self.pgd_steps < 0:
            raise ValueError(f"pgd_steps: expected an int >= 0, got {self.pgd_steps!r}")
        for name in ("lr", "eps", "lam"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a value >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.noise_prob <= 1.0:
            raise ValueError(f"noise_prob: expected a value in [0, 1], got {self.noise_prob!r}")


def _distance(kind: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample D between two (features, logits) outputs: mean squared feature difference, or KL(p_a || p_b)."""
    if kind == "feature_mse":
        return (a[0].flatten(1) - b[0].flatten(1)).square().mean(1)
    logp_a = F.log_softmax(a[1], dim=1)
    return (logp_a.exp() * (logp_a - F.log_softmax(b[1], dim=1))).sum(1)


def trades_inner_max(net: nn.Module, x: torch.Tensor, *, eps: float, steps: int, step_size: float | None,
                     distance: str, gen: torch.Generator) -> torch.Tensor:
    """argmax over the L-inf eps-ball (and [0, 1]) of D(c(x), c(x + delta)) by ``steps`` sign-gradient steps.

    x: (B, C, H, W) in [0, 1]. Returns the adversarial images, detached."""
    if steps == 0 or eps == 0:
        return x.detach()
    alpha = 2.5 * eps / steps if step_size is None else step_size
    with torch.no_grad():
        clean = tuple(t.detach() for t in net(x))
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)).clamp(0.0, 1.0)
    for _ in range(steps):
        xg = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_distance(distance, clean, net(xg)).sum(), xg)
        x_adv = x_adv + alpha * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def noise_augment(x: torch.Tensor, *, prob: float, levels: tuple[int, int], gen: torch.Generator,
                  schedule: VPSchedule = DIFFPURE_SCHEDULE) -> torch.Tensor:
    """x (B, C, H, W) in [0, 1] with a ``prob`` fraction of the samples replaced by ``sqrt(abar_l) u + sqrt(1 -
    abar_l) z`` (u = 2x - 1, l uniform in levels[0] .. levels[1] - 1), mapped back to [0, 1] units (not clipped: the
    chain's states are not). The choice, levels and noise are drawn from ``gen``."""
    b = x.shape[0]
    pick = torch.rand(b, generator=gen) < prob
    levels = torch.randint(levels[0], levels[1], (b,), generator=gen)
    z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    ab = schedule.discrete_alpha_bar().to(x.dtype)[levels].reshape(b, *([1] * (x.dim() - 1)))
    noisy = (ab.sqrt() * (2.0 * x.cpu() - 1.0) + (1.0 - ab).sqrt() * z + 1.0) / 2.0
    mask = pick.reshape(b, *([1] * (x.dim() - 1)))
    return torch.where(mask, noisy, x.cpu()).to(x.device)


def train_auxiliary(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AuxTrainConfig = AuxTrainConfig(), *,
                    x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None,
                    progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``net`` (returning (features, logits); initialised by the caller) in place on x (N, C, H, W) in [0, 1],
    y (N,) int64, with ``cfg``'s TRADES-like objective (AdamW, one-cycle schedule). Leaves ``net`` in eval mode.

    Returns the per-epoch history: mean loss terms, and the clean test accuracy when a test split is given.
    ``progress`` is called with each epoch's entry."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    history = []
    for epoch in range(cfg.epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        sums = {"loss": 0.0, "ce": 0.0, "robust": 0.0}
        for i in range(0, len(x), cfg.batch):
            idx = order[i:i + cfg.batch]
            xb, yb = x[idx], y[idx]
            if cfg.noise_prob > 0:
                xb = noise_augment(xb, prob=cfg.noise_prob, levels=(0, cfg.noise_level), gen=gen)
            # The inner maximisation with BatchNorm in eval mode (running statistics), as TRADES' code does.
            net.eval()
            x_adv = trades_inner_max(net, xb, eps=cfg.eps, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size,
                                     distance=cfg.distance, gen=gen)
            net.train()
            out = net(xb)
            ce = F.cross_entropy(out[1], yb)
            robust = _distance(cfg.distance, out, net(x_adv)).mean()
            loss = ce + cfg.lam * robust
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = len(idx)
            for k, v in (("loss", loss), ("ce", ce), ("robust", robust)):
                sums[k] += v.item() * n
        entry = {"epoch": epoch + 1, **{k: v / len(x) for k, v in sums.items()}}
        net.eval()
        if x_test is not None:
            entry["test_acc"] = auxiliary_accuracy(net, x_test, y_test)
        history.append(entry)
        if progress is not None:
            progress(entry)
    net.eval()
    return history


def auxiliary_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.0, steps: int = 0,
                       batch: int = 256, seed: int = 0) -> float:
    """Accuracy of the auxiliary's logits on x (N, C, H, W) in [0, 1]; with eps > 0, under L-inf PGD on the
    cross-entropy (``steps`` steps, random start seeded by ``seed``)."""
    correct = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if eps > 0 and steps > 0:
            xb = pgd_linf(lambda v, _draw: net(v)[1], xb, yb, eps=eps, steps=steps, seed=seed + i)
        with torch.no_grad():
            correct += int((net(xb)[1].argmax(1) == yb).sum())
    return correct / len(x)


def init_auxiliary(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` with its parameters initialised from ``seed`` (torch's global RNG restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def noisy_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, level: int, *, seed: int = 0,
                   schedule: VPSchedule = DIFFPURE_SCHEDULE) -> float:
    """Accuracy on x (N, C, H, W) in [0, 1] noised to discrete level ``level`` (what c_phi sees in the chain)."""
    gen = torch.Generator().manual_seed(seed)
    noisy = noise_augment(x, prob=1.0, levels=(level, level + 1), gen=gen, schedule=schedule)
    return auxiliary_accuracy(net, noisy, y)
