"""Classifier sources of an evaluation: images (B, C, H, W) in [0, 1] -> logits (B, K), in eval mode, frozen.

``load_classifier_spec`` takes what ``dpf.load_classifier`` takes (``models.classifiers``: DiffPure's classifier
names with their official checkpoints, ``digits``, ``robustbench:``/``torchvision:``/``timm:`` specs, a TorchScript
file, ``package.module:function``, an ``nn.Module`` in eval mode), with errors naming the argument ``classifier``.
AGDM's auxiliary networks (``load_auxiliary_spec``) come from the plain specs, ``digits`` being the shipped
adversarially trained auxiliary network.
"""

from __future__ import annotations

from torch import nn

from ..models.classifiers import load_classifier, load_module

__all__ = ["load_auxiliary_spec", "load_classifier_spec"]


def load_classifier_spec(spec, device="cpu", **options) -> nn.Module:
    """The classifier an evaluation attacks (inputs in [0, 1], logits out); ``options``: ``load_classifier``'s
    (``checkpoint``, ``normalize``, ``trust_checkpoint``, architecture keywords)."""
    return load_classifier(spec, device=device, what="classifier", **options)


def load_auxiliary_spec(spec, device="cpu") -> nn.Module:
    """AGDM's auxiliary network (``dpf.load_auxiliary`` for ``"digits"``): returns (features, logits)."""
    import torch

    from ..models.auxiliary import load_auxiliary

    return load_module(spec, what="auxiliary", device=torch.device(device),
                       load_digits=lambda dev: load_auxiliary("digits", dev))
