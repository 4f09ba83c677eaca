"""A defended classifier ``classifier(purifier(x))`` whose purification noise is chosen per call.

Attacks and the evaluation protocol call ``logits(x, seed=, noise_ids=)``: the noise of every purification is then
a pure function of (seed, noise id), never of the batch, the process or the call order. ``forward(x)`` (for
packages such as AutoAttack that call ``model(x)``) draws a fresh seed per call from a counter, see
``CallCountedModel``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .._validate import check_eval_mode

__all__ = ["CallCountedModel", "DefendedClassifier"]


class DefendedClassifier(nn.Module):
    """``classifier(purifier(x))``; ``purifier=None`` is the undefended classifier (a baseline).

    purifier: a ``Purifier`` (or any module with a ``seed`` attribute and ``forward(x, noise_ids=)``), its
    ``grad_mode`` decides the attack's gradient. classifier: images (B, C, H, W) in [0, 1] -> logits (B, K).
    Both networks must have no submodule in training mode (``ValueError`` naming ``classifier`` or ``defense``
    otherwise): nothing here switches a caller's network between modes.
    """

    def __init__(self, purifier: nn.Module | None, classifier: nn.Module):
        super().__init__()
        if purifier is not None and not hasattr(purifier, "seed"):
            raise TypeError(f"defense: expected a Purifier (a module with a 'seed' attribute and "
                            f"forward(x, noise_ids=)), got {type(purifier).__name__}")
        if not callable(classifier):
            raise TypeError(f"classifier: expected an nn.Module mapping images to logits, got "
                            f"{type(classifier).__name__}")
        check_eval_mode("classifier", classifier)
        if purifier is not None:
            check_eval_mode("defense", getattr(purifier, "model", None), remedy="defense.eval()")
        self.purifier = purifier
        self.classifier = classifier

    @property
    def grad_mode(self) -> str:
        return "classifier only" if self.purifier is None else self.purifier.config.grad_mode

    @contextlib.contextmanager
    def _seeded(self, seed: int):
        # The Purifier reads its seed at each call; set it for this call only (restored even on error).
        old = self.purifier.seed
        self.purifier.seed = seed
        try:
            yield self.purifier
        finally:
            self.purifier.seed = old

    def purify(self, x: torch.Tensor, *, seed: int, noise_ids: torch.Tensor) -> torch.Tensor:
        """Purified images (B, C, H, W) with the noise of (seed, noise_ids (B,)); x itself if undefended."""
        if self.purifier is None:
            return x
        with self._seeded(seed) as purifier:
            return purifier(x, noise_ids=noise_ids)

    def trajectory(self, x: torch.Tensor, *, seed: int, noise_ids: torch.Tensor, every: int = 1):
        """``Purifier.trajectory`` with the noise of (seed, noise_ids): the purified images and every ``every``-th
        intermediate state of each round (an ``engine.Trajectory``)."""
        if self.purifier is None:
            raise ValueError("defense: the undefended classifier has no purification chain, so no intermediate states "
                             "(DiffAttack's loss needs a Purifier)")
        with self._seeded(seed) as purifier:
            return purifier.trajectory(x, noise_ids=noise_ids, every=every)

    def logits(self, x: torch.Tensor, *, seed: int, noise_ids: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of the purified x; differentiable in x through the purifier's grad_mode."""
        check_eval_mode("classifier", self.classifier)  # per call: cheap, and the caller may have switched it
        return self.classifier(self.purify(x, seed=seed, noise_ids=noise_ids))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("DefendedClassifier: call logits(x, seed=, noise_ids=) (the noise is explicit); wrap it in "
                        "CallCountedModel for packages that call model(x)")


class CallCountedModel(nn.Module):
    """``model(x)`` for third-party attacks: call c purifies with seed ``derive_seed(seed, 'call', c)`` and noise ids
    ``0..B-1``, so a run is reproducible given the same inputs and call sequence (AutoAttack's own batches)."""

    def __init__(self, defended: DefendedClassifier, seed: int):
        super().__init__()
        self.defended = defended
        self.seed = seed
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .randomness import derive_seed

        seed = derive_seed(self.seed, "call", self.calls)
        self.calls += 1
        return self.defended.logits(x, seed=seed, noise_ids=torch.arange(x.shape[0], device=x.device))
