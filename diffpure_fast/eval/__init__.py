"""Evaluation helpers: accuracy with confidence intervals (worst-of-N / majority-vote protocols come next)."""

from .metrics import Accuracy, wilson_interval

__all__ = ["Accuracy", "wilson_interval"]
