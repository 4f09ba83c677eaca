"""Accuracy with a 95% Wilson score interval (Wilson 1927): honest for small test sets and accuracies near 0 or 1,
where the normal approximation's interval leaves [0, 1]."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Accuracy", "wilson_interval"]

Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``correct`` successes out of ``total`` trials."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"correct, total: expected 0 <= correct <= total and total > 0, got {correct}, {total}")
    p = correct / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # At 0 or total successes the bound is exactly 0 or 1; the float expression leaves ~1e-17 of round-off.
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == total else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    def as_dict(self) -> dict:
        lo, hi = self.interval
        return {"accuracy": self.value, "correct": self.correct, "total": self.total, "wilson95": [lo, hi]}

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({self.correct}/{self.total})"
