"""AutoAttack through either package users have, unpatched, imported only when asked for.

* ``autoattack`` (git, fra31/auto-attack): ``AutoAttack(model, norm=, eps=, version=, verbose=, seed=, device=)``,
  ``run_standard_evaluation(x, y, bs=)`` returns the adversarial images;
* ``pyautoattack`` (PyPI): keyword-only ``AutoAttack(model, *, norm=, eps=, version=, seed=, device=)``,
  ``run_standard_evaluation(x, y, batch_size=)`` returns ``(x_adv, y_adv)``.

``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square; ``"rand"`` runs APGD-CE and APGD-DLR with 20 EOT
iterations (the packages' own settings: nothing is overridden). Both packages seed torch's global RNG themselves.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .._optional import INSTALL, MissingDependency

__all__ = ["AA_PACKAGES", "AA_VERSIONS", "autoattack_package", "run_autoattack"]

AA_PACKAGES = ("autoattack", "pyautoattack")
AA_VERSIONS = ("standard", "rand")
_NORMS = {"linf": "Linf", "l2": "L2"}


def autoattack_package(package: str = "auto") -> tuple[str, object]:
    """(name, module) of the AutoAttack package to use: ``auto`` takes the git ``autoattack`` when importable, else
    ``pyautoattack``. A missing package raises ``MissingDependency`` (an ImportError) saying how to install it."""
    if package not in ("auto", *AA_PACKAGES):
        raise ValueError(f"aa_package: expected 'auto' or one of {AA_PACKAGES}, got {package!r}")
    names = AA_PACKAGES if package == "auto" else (package,)
    for name in names:
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    hint = " or ".join(f"`{INSTALL[n]}`" for n in names)
    raise MissingDependency(f"{' / '.join(names)} is not installed (needed for AutoAttack); install it with {hint}")


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, version: str,
                   seed: int, batch_size: int, package: str = "auto", device=None) -> torch.Tensor:
    """AutoAttack's adversarial images (B, C, H, W) in [0, 1] for ``model(x) -> logits`` (x in [0, 1])."""
    if version not in AA_VERSIONS:
        raise ValueError(f"aa_version: expected one of {AA_VERSIONS}, got {version!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm: AutoAttack runs here with one of {tuple(_NORMS)}, got {norm!r}")
    name, mod = autoattack_package(package)
    device = device if device is not None else x.device
    if name == "autoattack":
        adversary = mod.AutoAttack(model, norm=_NORMS[norm], eps=eps, version=version, verbose=False, seed=seed,
                                   device=str(device))
        return adversary.run_standard_evaluation(x, y, bs=batch_size)
    adversary = mod.AutoAttack(model, norm=_NORMS[norm], eps=eps, version=version, seed=seed, device=str(device))
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv
