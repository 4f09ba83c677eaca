"""Which adversarial candidate of a sample is judged: chosen by fresh-noise evaluations, never by one noisy call.

An attack (PGD-EOT restarts, the runs of AutoAttack's ensemble) leaves one candidate per run and sample; for a
randomized defense the packages keep the first candidate that one noisy evaluation misclassified, and fall back to
the clean input when none did (AutoAttack's "random escape", its pull requests #104/#105). Here every candidate is
classified ``n_select`` times with noise of its own (``derive_seed(seed, 'select', e)``: neither the attack's nor
the judge's), and each sample keeps the candidate misclassified most often, ties broken by the lowest mean margin
``z_y - max_{k != y} z_k`` (then by run order). The clean input is never a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .randomness import derive_seed

__all__ = ["Candidate", "Selection", "select_candidates"]


@dataclass
class Candidate:
    """One run's adversarial images for a batch of B: ``x`` (B, C, H, W) within the attack's bound, ``found`` (B,)
    bool (False where the run produced nothing for the sample, e.g. FAB without an adversarial point inside the
    ball); ``measure`` (B,) the bound's quantity where it is not an L-p norm of x - x_clean (the LPIPS distance, the
    flow's size), else None."""

    name: str
    x: torch.Tensor
    found: torch.Tensor
    measure: torch.Tensor | None = None


@dataclass
class Selection:
    """x_adv: (B, C, H, W) the chosen candidates; chosen: (B,) int64 index into the candidate list;
    wrong: (n_candidates, B) misclassifications among the n_select draws (-1 where not found); margin: the mean
    margins (NaN where not found)."""

    x_adv: torch.Tensor
    chosen: torch.Tensor
    wrong: torch.Tensor
    margin: torch.Tensor


def select_candidates(defended, y: torch.Tensor, sample_ids: torch.Tensor, candidates: list[Candidate], *,
                      seed: int, n_select: int, chunk_size: int | None = None) -> Selection:
    """Choose per sample among ``candidates`` (see the module docstring). A single candidate is taken as it is,
    without evaluations. Every sample needs at least one found candidate (ValueError otherwise).

    y: (B,) int64 labels; sample_ids: (B,) int64 global indices, the noise ids of the evaluations.
    """
    if not candidates:
        raise ValueError("candidates: expected at least one")
    found = torch.stack([c.found.to(torch.bool).cpu() for c in candidates])
    if not bool(found.any(0).all()):
        missing = (~found.any(0)).nonzero().flatten().tolist()
        raise ValueError(f"candidates: samples at positions {missing} have no candidate (every sample must be "
                         f"attacked)")
    b = y.shape[0]
    if len(candidates) == 1:
        return Selection(candidates[0].x, torch.zeros(b, dtype=torch.int64), torch.full((1, b), -1),
                         torch.full((1, b), float("nan"), dtype=torch.float64))
    ids = sample_ids.to(candidates[0].x.device)
    step = chunk_size or b
    wrong = torch.full((len(candidates), b), -1, dtype=torch.int64)
    margin = torch.full((len(candidates), b), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for k, cand in enumerate(candidates):
            n_wrong = torch.zeros(b, dtype=torch.int64)
            m_sum = torch.zeros(b, dtype=torch.float64)
            for e in range(n_select):
                s = derive_seed(seed, "select", e)
                logits = torch.cat([defended.logits(cand.x[c0:c0 + step], seed=s, noise_ids=ids[c0:c0 + step])
                                    for c0 in range(0, b, step)]).double().cpu()
                yc = y.cpu()
                z_y = logits.gather(1, yc[:, None])[:, 0]
                other = logits.scatter(1, yc[:, None], float("-inf")).amax(1)
                n_wrong += (logits.argmax(1) != yc).to(torch.int64)
                m_sum += z_y - other
            wrong[k] = torch.where(found[k], n_wrong, -1)
            margin[k] = torch.where(found[k], m_sum / n_select, float("nan"))
    # lexicographic: most misclassifications, then the lowest mean margin, then the earliest run
    key = wrong.double() * 1e12 - torch.nan_to_num(margin, nan=0.0).clamp(-1e11, 1e11)
    key[~found] = float("-inf")
    chosen = key.argmax(0)
    stacked = torch.stack([c.x for c in candidates])
    x_adv = stacked[chosen.to(stacked.device), torch.arange(b, device=stacked.device)]
    return Selection(x_adv, chosen, wrong, margin)
