"""Attacks through the purifier: PGD-EOT (L-inf, L2; CE / DLR / CW losses and their targeted forms; batched EOT),
BPDA+EOT (PGD-EOT through ``grad_mode="bpda"``), APGD-EOT (``apgd``: AutoAttack's APGD with EOT, or another gradient
oracle), DiffAttack (``diffattack``), DiffHammer (``diffhammer``), the unrestricted LF, PPGD and StAdv
(``unrestricted``, with the LPIPS distance of ``perceptual``), AutoAttack natively or as released (``autoattack``; the
packages imported lazily), and the fresh-noise selection among an attack's candidates (``selection``). Every attack
takes a fixed-noise seed (``randomness.attack_seed``)."""

from .apgd import APGDResult, apgd_eot
from .defended import CallCountedModel, DefendedClassifier
from .pgd import EOT_REDUCTIONS, LOSSES, NORMS, TARGETED_LOSSES, PGDResult, attack_loss, eot_gradient, pgd_eot, pgd_linf
from .randomness import derive_seed, eot_noise_ids
from .selection import Candidate, Selection, select_candidates

__all__ = ["APGDResult", "EOT_REDUCTIONS", "LOSSES", "NORMS", "TARGETED_LOSSES", "CallCountedModel", "Candidate",
           "DefendedClassifier", "PGDResult", "Selection", "apgd_eot", "attack_loss", "derive_seed", "eot_gradient",
           "eot_noise_ids", "pgd_eot", "pgd_linf", "select_candidates"]
