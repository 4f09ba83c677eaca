"""Small, deterministic epsilon networks for tests and benchmarks (per-sample: no batch statistics)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.base import EpsModel

__all__ = ["GaussianEps", "TinyAuxNet", "TinyEpsNet", "tiny_score_model"]


class TinyEpsNet(nn.Module):
    """Two 3x3 convolutions with a sinusoidal time embedding and SiLU: smooth, nonlinear in x and t.

    learned_sigma: also output guided-diffusion style variance channels (``tanh``, in (-1, 1)) after epsilon."""

    def __init__(self, channels: int = 3, hidden: int = 16, seed: int = 0, learned_sigma: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.learned_sigma = learned_sigma
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2 * channels if learned_sigma else channels, 3, padding=1)
        self.temb = nn.Linear(8, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(1, p[0].numel()))))

    def forward(self, x, labels):
        freqs = torch.arange(4, device=x.device, dtype=x.dtype)
        ang = labels.to(x.dtype)[:, None] / 1000.0 * torch.exp(freqs)[None, :] * 10.0
        emb = self.temb(torch.cat([ang.sin(), ang.cos()], dim=1))
        h = torch.nn.functional.silu(self.conv1(x) + emb[:, :, None, None])
        out = self.conv2(h)
        if not self.learned_sigma:
            return out + 0.1 * x
        c = x.shape[1]
        return torch.cat([out[:, :c] + 0.1 * x, torch.tanh(out[:, c:])], dim=1)


def tiny_score_model(channels: int = 3, hidden: int = 16, seed: int = 0, dtype=torch.float32, *,
                     learned_sigma: bool = False) -> EpsModel:
    """A TinyEpsNet as a ScoreModel: continuous time (999 t), or with ``learned_sigma`` a discrete-time network (the
    integer level) with variance channels, as guided-diffusion's."""
    net = TinyEpsNet(channels, hidden, seed, learned_sigma).to(dtype).eval()
    return EpsModel(net, time_input="discrete" if learned_sigma else "continuous", learned_sigma=learned_sigma)


class TinyAuxNet(nn.Module):
    """A smooth auxiliary network for AGDM tests: conv-tanh, linear-tanh (the features), linear (the logits).

    Input (B, channels, H, W) with H * W = ``pixels``; output (features (B, features), logits (B, classes))."""

    def __init__(self, channels: int = 3, pixels: int = 20, features: int = 6, classes: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.feat = nn.Linear(4 * pixels, features)
        self.head = nn.Linear(features, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(max(1, p[0].numel()))))

    def forward(self, x):
        f = torch.tanh(self.feat(torch.tanh(self.conv(x)).flatten(1)))
        return f, self.head(f)


class GaussianEps(nn.Module):
    """The exact epsilon for data x0 ~ N(0, s0^2 I): the reverse SDE is then linear with a known marginal,
    ``x_t ~ N(0, v(t) I)`` with ``v(t) = alpha_bar(t) s0^2 + 1 - alpha_bar(t)`` and ``eps = sigma(t) x / v(t)``."""

    def __init__(self, schedule, s0: float = 0.5):
        super().__init__()
        self.schedule = schedule
        self.s0 = s0
        self.eval()  # a fixed function: nothing depends on the mode, and purify refuses training mode

    def variance(self, t):
        ab = self.schedule.alpha_bar(t)
        return ab * self.s0 ** 2 + 1.0 - ab

    def forward(self, x, t):
        t = t.to(torch.float64)
        scale = (self.schedule.sigma(t) / self.variance(t)).to(x.dtype)
        return scale.reshape(-1, 1, 1, 1) * x
