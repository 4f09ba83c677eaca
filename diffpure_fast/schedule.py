"""The VP-SDE noise schedule of DiffPure (score_sde's VPSDE with beta_min=0.1, beta_max=20).

Two views of one schedule are needed, because the official pipeline mixes them:

* continuous: ``beta(t) = b0 + t (b1 - b0)``, ``alpha_bar(t) = exp(-t^2 (b1 - b0) / 2 - t b0)``, used by the
  reverse SDE (drift, diffusion, the score's ``std(t)``);
* discrete: ``betas = linspace(b0 / N, b1 / N, N)``, ``alpha_bar = cumprod(1 - betas)``, used by DiffPure's one-shot
  forward diffusion at level ``round(N t*)`` and by the ancestral DDPM solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validate import OptionError, check_float, check_int

__all__ = ["DIFFPURE_SCHEDULE", "VPSchedule"]


@dataclass(frozen=True)
class VPSchedule:
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_levels: int = 1000

    def __post_init__(self):
        # stored as the Python float/int they equal, so equal schedules compare (and print) equal
        object.__setattr__(self, "beta_min", check_float("beta_min", self.beta_min, low=0.0, low_open=True))
        object.__setattr__(self, "beta_max", check_float("beta_max", self.beta_max))
        if not self.beta_min < self.beta_max:
            raise OptionError("beta_max", f"expected a value > beta_min = {self.beta_min}, got {self.beta_max}")
        object.__setattr__(self, "num_levels", check_int("num_levels", self.num_levels))

    # ---- continuous schedule (functions of a float or a tensor of times t in [0, 1]) ----
    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t):
        return -0.5 * t * t * (self.beta_max - self.beta_min) - t * self.beta_min

    def alpha_bar(self, t):
        if isinstance(t, torch.Tensor):
            return torch.exp(self.log_alpha_bar(t))
        return math.exp(self.log_alpha_bar(t))

    def sigma(self, t):
        """Marginal std ``sqrt(1 - alpha_bar(t))``: the divisor that turns epsilon into a score."""
        if isinstance(t, torch.Tensor):
            # score_sde computes std = sqrt(1 - exp(2 * log_mean_coeff)) in the tensor's dtype; same expression.
            return torch.sqrt(1.0 - torch.exp(self.log_alpha_bar(t)))
        return math.sqrt(-math.expm1(self.log_alpha_bar(t)))

    # ---- discrete schedule (float64, indexed by level 0..N-1) ----
    def discrete_betas(self) -> torch.Tensor:
        n = self.num_levels
        return torch.linspace(self.beta_min / n, self.beta_max / n, n, dtype=torch.float64)

    def discrete_alpha_bar(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.discrete_betas(), dim=0)

    def level_of(self, t_star: float) -> int:
        """DiffPure's integer diffusion level for ``t*``: ``round(N t*)`` (``args.t`` in the official code). The
        one place t* is rounded; a run records the level it used (``PurifyConfig.resolved``)."""
        return int(round(self.num_levels * t_star))


DIFFPURE_SCHEDULE = VPSchedule()
