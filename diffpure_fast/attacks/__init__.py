"""Attacks through the purifier (PGD with EOT now; AutoAttack, BPDA+EOT drivers and DiffHammer-style attacks are on
the roadmap and plug in through the same ``forward(x, draw) -> logits`` convention)."""

from .pgd import pgd_linf

__all__ = ["pgd_linf"]
