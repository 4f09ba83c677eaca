"""Attacks through the purifier: PGD-EOT (L-inf, L2; CE / DLR / CW losses; batched EOT), BPDA+EOT (PGD-EOT through
``grad_mode="bpda"``), and adapters for both AutoAttack packages (``attacks.autoattack``, imported lazily)."""

from .defended import CallCountedModel, DefendedClassifier
from .pgd import EOT_REDUCTIONS, LOSSES, NORMS, PGDResult, attack_loss, eot_gradient, pgd_eot, pgd_linf
from .randomness import derive_seed, eot_noise_ids

__all__ = ["EOT_REDUCTIONS", "LOSSES", "NORMS", "CallCountedModel", "DefendedClassifier", "PGDResult",
           "attack_loss", "derive_seed", "eot_gradient", "eot_noise_ids", "pgd_eot", "pgd_linf"]
