"""Auxiliary networks for adversarial guidance (AGDM, ``diffpure_fast.methods.agdm``): a classifier ``c_phi`` whose
latent representation and logits guide the reverse process.

An auxiliary network is any ``nn.Module`` that maps images to ``(features, logits)``: features (B, ...) (flattened to
(B, F) by the guidance), logits (B, K). A plain classifier (logits only) becomes one with ``feature_layer``: the
output of that named submodule, read by a forward hook during the call, is the latent representation.

The embedded one (``load_auxiliary("digits")``) is an ``AuxiliaryCNN`` trained adversarially on the digits data by
``scripts/train_auxiliary.py`` (``diffpure_fast.train.auxiliary``) and shipped as safetensors with its training log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._validate import check_int
from .digits import WEIGHTS_DIR, load_weights, read_weights

__all__ = ["AUXILIARY_WEIGHTS", "AuxiliaryCNN", "auxiliary_outputs", "load_auxiliary"]

AUXILIARY_WEIGHTS = WEIGHTS_DIR / "digits_auxiliary.safetensors"
_TRAIN_HINT = ("train it (a few minutes on 2 CPU cores, no downloads) with:\n"
               "    python scripts/train_auxiliary.py --out diffpure_fast/weights")


class AuxiliaryCNN(nn.Module):
    """conv-bn-relu, max-pool, conv-bn-relu, max-pool, then a hidden layer (the features) and the logits.

    Input: (B, in_channels, R, R) images in [0, 1] (centred internally), R divisible by 4. Output: (features
    (B, hidden), logits (B, num_classes)). BatchNorm and no dropout: in eval mode the network is a fixed function,
    which the exact gradients through the guidance need.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, resolution: int = 16,
                 channels: tuple[int, int] = (16, 32), hidden: int = 64):
        super().__init__()
        in_channels, num_classes, resolution, hidden = (check_int(n, v) for n, v in (
            ("in_channels", in_channels), ("num_classes", num_classes), ("resolution", resolution), ("hidden", hidden)))
        if resolution % 4 != 0:
            raise ValueError(f"resolution: expected a multiple of 4, got {resolution}")
        c1, c2 = (check_int("channels", c) for c in channels)
        self.config: dict[str, Any] = dict(in_channels=in_channels, num_classes=num_classes,
                                           resolution=resolution, channels=[c1, c2], hidden=hidden)
        self.in_channels, self.image_size = in_channels, resolution
        # Softplus, not ReLU: the exact gradient through the guidance differentiates the network twice; a ReLU
        # network's own curvature is zero almost everywhere, so that part of the second-order term would vanish
        # (the exact gradient stays exact, but smooth activations keep every term informative and make the
        # double-backward tests meaningful).
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.Softplus(), nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.Softplus(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (resolution // 4) ** 2, hidden), nn.Softplus(),
        )
        self.head = nn.Linear(hidden, num_classes)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AuxiliaryCNN:
        cfg = dict(config)
        cfg["channels"] = tuple(cfg.get("channels", (16, 32)))
        return cls(**cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x - 0.5)
        return features, self.head(features)


def auxiliary_outputs(net: nn.Module, x: torch.Tensor, feature_layer: str | None = None, *,
                      need_features: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(features (B, F), logits (B, K))`` of an auxiliary network on x (B, C, H, W), in the network's input range.

    feature_layer: None (the network returns ``(features, logits)``) or the dotted name of a submodule (as in
    ``net.named_modules()``) whose output is the features, the network then returning logits (or a pair whose
    second element is the logits). need_features=False (distances on logits): a network returning logits only is
    accepted, and features is None. Errors name the ``auxiliary`` argument and say what was expected.
    """
    captured: list[torch.Tensor] = []
    handle = None
    if feature_layer is not None:
        modules = dict(net.named_modules())
        if feature_layer not in modules:
            names = [n for n in modules if n][:12]
            raise ValueError(f"feature_layer: the auxiliary network has no submodule {feature_layer!r} (some of its "
                             f"submodules: {', '.join(names)})")
        handle = modules[feature_layer].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = net(x)
    except RuntimeError as exc:
        raise ValueError(f"auxiliary: the network failed on an input of shape {tuple(x.shape)} "
                         f"({str(exc).splitlines()[0]}); it must take the purified images' shape") from None
    finally:
        if handle is not None:
            handle.remove()
    if feature_layer is not None:
        if not captured or not isinstance(captured[-1], torch.Tensor):
            raise ValueError(f"feature_layer: submodule {feature_layer!r} did not produce a tensor in the forward "
                             f"pass")
        features = captured[-1]
        logits = out[1] if isinstance(out, (tuple, list)) else out
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        features, logits = out
    elif isinstance(out, torch.Tensor) and not need_features:
        features, logits = None, out
    else:
        raise ValueError("auxiliary: expected a network returning (features, logits), got "
                         f"{type(out).__name__}{' (logits only?)' if isinstance(out, torch.Tensor) else ''}; for a "
                         "plain classifier name its latent layer with feature_layer=..., or use a distance on the "
                         "logits (distance='logit_mse' or 'kl')")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"auxiliary: expected logits of shape (B={x.shape[0]}, classes), got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if features is None:
        return None, logits
    if not isinstance(features, torch.Tensor) or features.dim() < 2 or features.shape[0] != x.shape[0]:
        raise ValueError(f"auxiliary: expected features of shape (B={x.shape[0]}, ...), got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    return features.flatten(1), logits


def load_auxiliary(name: str = "digits", device: str | torch.device | None = None, *,
                   path: str | Path | None = None) -> AuxiliaryCNN:
    """A shipped auxiliary network, in eval mode and frozen: ``"digits"`` (``AuxiliaryCNN`` for 1x16x16 images in
    [0, 1], adversarially trained by ``scripts/train_auxiliary.py``; its log is ``weights/auxiliary_log.json``)."""
    if name != "digits":
        raise ValueError(f"name: expected 'digits' (the one shipped auxiliary network), got {name!r}; load your own "
                         f"network and pass it as auxiliary=")
    state, config, _ = read_weights(path, kind="auxiliary", default=AUXILIARY_WEIGHTS, hint=_TRAIN_HINT)
    net = load_weights(AuxiliaryCNN.from_config(config), state, path)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net if device is None else net.to(device)
