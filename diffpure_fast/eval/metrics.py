"""Accuracy with a 95% Wilson score interval (Wilson 1927): honest for small test sets and accuracies near 0 or 1,
where the normal approximation's interval leaves [0, 1]; and the protocol metrics of a randomized defense judged
``n_eval`` times per sample (single-shot, mean, worst-of-N, majority vote) and the attack-success curve."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

__all__ = ["Accuracy", "PROTOCOL_METRICS", "majority_vote_correct", "protocol_metrics", "robust_curve",
           "wilson_interval"]

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


PROTOCOL_METRICS = ("single_shot", "mean", "worst_of_n", "majority_vote")


def majority_vote_correct(preds, label: int) -> bool:
    """True if ``label`` is predicted strictly more often than any other class among ``preds`` (a tie is not a
    win: the defense cannot name the class, so it counts as wrong)."""
    counts = Counter(int(p) for p in preds)
    mine = counts.pop(int(label), 0)
    return mine > 0 and all(mine > c for c in counts.values())


def protocol_metrics(labels, preds) -> dict[str, Accuracy]:
    """The four accuracies of a randomized defense judged N = ``n_eval`` times per sample with fresh noise.

    labels: (n,) ints; preds: (n, N) ints, prediction of evaluation e for sample i.
    * ``single_shot``: evaluation 0 alone (what one deployment call gives);
    * ``mean``: the average over all n * N (sample, evaluation) pairs; its Wilson interval treats the N draws of a
      sample as independent trials, which they are not, so it is narrower than the truth;
    * ``worst_of_n``: robust only if correct on all N (DiffHammer's Wor.Rob);
    * ``majority_vote``: the label wins a strict plurality of the N predictions (ties count as wrong).
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(preds, dtype=np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 1:
        raise ValueError(f"preds: expected shape (n, n_eval) with n = {y.shape[0]} (labels) and n_eval >= 1, got "
                         f"{p.shape}")
    if y.shape[0] == 0:
        raise ValueError("labels: expected at least one sample, got 0")
    ok = p == y[:, None]
    n, n_eval = p.shape
    return {
        "single_shot": Accuracy(int(ok[:, 0].sum()), n),
        "mean": Accuracy(int(ok.sum()), n * n_eval),
        "worst_of_n": Accuracy(int(ok.all(1).sum()), n),
        "majority_vote": Accuracy(sum(majority_vote_correct(p[i], y[i]) for i in range(n)), n),
    }


def robust_curve(labels, pred_traces) -> list[Accuracy]:
    """Robust accuracy after each attack step, from the attack's own per-step EOT predictions.

    labels: (n,); pred_traces: (n, R, S + 1), the prediction at iterate s of restart r. A sample counts as robust at
    step s when it is classified correctly at iterate s of *every* restart (the attack run with R restarts and
    stopped after s steps). Returns S + 1 accuracies (index 0: the start points, before any step).
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    t = np.asarray(pred_traces, dtype=np.int64)
    if t.ndim != 3 or t.shape[0] != y.shape[0]:
        raise ValueError(f"pred_traces: expected shape (n, restarts, steps + 1) with n = {y.shape[0]}, got {t.shape}")
    ok = (t == y[:, None, None]).all(1)
    return [Accuracy(int(ok[:, s].sum()), y.shape[0]) for s in range(t.shape[2])]
