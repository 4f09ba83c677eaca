"""The perceptual distance of the unrestricted attacks: LPIPS in Laidlaw et al.'s form, over a feature network the user
gives as a local file (never downloaded).

``d(x1, x2) = || phi(x1) - phi(x2) ||_2`` where ``phi`` takes each chosen layer's activations (B, C_l, H_l, W_l),
divides every position's channel vector by its L2 norm (+ 1e-10) and by ``sqrt(H_l W_l)``, and concatenates the
layers (Laidlaw, Singla & Feizi, "Perceptual Adversarial Robustness", ICLR 2021, ``distances.py``
``normalize_flatten_features``): the square root of Zhang et al.'s LPIPS (CVPR 2018) with uniform layer weights, no
learned linear heads. Their bounds (e.g. 0.5 over AlexNet on CIFAR-10) are in this unit.

Feature networks (``load_lpips``):

* ``"alexnet:PATH"``: AlexNet's convolutional trunk (torchvision's layout), the 5 ReLU outputs, ImageNet input
  normalisation; PATH: a torchvision ``alexnet`` state dict (``features.N.*``; ``classifier.*`` is ignored) as
  ``.pth`` (read with ``weights_only=True``) or ``.safetensors``;
* ``"vgg16:PATH"``: VGG-16's trunk, relu1_2 .. relu5_3 (LPIPS's VGG layers), the same normalisation and file kinds;
* ``"digits"``: the embedded digits classifier's four conv-ReLU outputs (a small network the project makes; the
  digits model's images are 16x16, too small for AlexNet). Used with the digits classifier as the attacked model this
  is Laidlaw et al.'s "self-bounded" LPIPS;
* ``"module:function"``: a function returning an ``nn.Module`` whose forward maps (B, C, H, W) in [0, 1] to a list of
  feature maps.

One-channel images are repeated to three channels for AlexNet and VGG.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from .._validate import OptionError, OptionFileNotFoundError, OptionTypeError

__all__ = ["LPIPS", "AlexNetFeatures", "SequentialFeatures", "VGG16Features", "load_lpips", "lpips_project"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class SequentialFeatures(nn.Module):
    """The outputs of chosen layers of an ``nn.Sequential`` trunk: ``forward(x) -> [trunk[:t0+1](x), ...]``.

    taps: indices into ``trunk`` whose outputs are features; shift, scale: the input map ``(x - shift) / scale``
    (per channel, applied first); gray_to_rgb: repeat a one-channel input to three channels first."""

    def __init__(self, trunk: nn.Sequential, taps: tuple[int, ...], *, shift=0.0, scale=1.0, gray_to_rgb=False):
        super().__init__()
        self.trunk = trunk[:max(taps) + 1]
        self.taps = tuple(taps)
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.gray_to_rgb = gray_to_rgb

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.gray_to_rgb and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for i, layer in enumerate(self.trunk):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out


def _alexnet_trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


def _vgg16_trunk() -> nn.Sequential:
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


def AlexNetFeatures() -> SequentialFeatures:  # noqa: N802 (a constructor)
    """AlexNet's trunk in torchvision's layout (``features.0`` .. ``features.12``), the 5 ReLU outputs (Laidlaw et
    al.'s ``AlexNetFeatureModel``), untrained until a state dict is loaded."""
    return SequentialFeatures(_alexnet_trunk(), (1, 4, 7, 9, 11), shift=_IMAGENET_MEAN, scale=_IMAGENET_STD,
                              gray_to_rgb=True)


def VGG16Features() -> SequentialFeatures:  # noqa: N802 (a constructor)
    """VGG-16's trunk in torchvision's layout, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS's VGG layers)."""
    return SequentialFeatures(_vgg16_trunk(), (3, 8, 15, 22, 29), shift=_IMAGENET_MEAN, scale=_IMAGENET_STD,
                              gray_to_rgb=True)


class LPIPS(nn.Module):
    """Laidlaw et al.'s LPIPS distance over ``net`` (see the module docstring); frozen, in eval mode.

    net: a module mapping (B, C, H, W) in [0, 1] to a list of feature maps (B, C_l, H_l, W_l)."""

    def __init__(self, net: nn.Module, description: str = "custom"):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.description = description

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, D) the normalised, flattened features."""
        out = []
        for f in self.net(x):
            norm = f.square().sum(1, keepdim=True).sqrt() + 1e-10
            out.append((f / (norm * (f.shape[2] * f.shape[3]) ** 0.5)).flatten(1))
        return torch.cat(out, 1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *, phi1: torch.Tensor | None = None) -> torch.Tensor:
        """d(x1, x2): (B,); phi1: ``features(x1)`` when already known."""
        return ((self.features(x1) if phi1 is None else phi1) - self.features(x2)).norm(dim=1)


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise OptionFileNotFoundError("lpips", f"no such file {path} (the network's weights are read from a local "
                                                f"file, never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise OptionError("lpips", f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


_SPECS = "'digits', 'alexnet:PATH', 'vgg16:PATH' or 'module:function'"


def load_lpips(spec: str, *, device="cpu") -> LPIPS:
    """The LPIPS distance of a spec (see the module docstring): ``digits``, ``alexnet:PATH``, ``vgg16:PATH`` or
    ``module:function``. A file's keys must match the network (an error names the missing ones)."""
    if not isinstance(spec, str) or not spec:
        raise OptionError("lpips", f"expected {_SPECS}, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        from ..models.digits import load_digits_classifier

        trunk = load_digits_classifier().features
        taps = tuple(i for i, m in enumerate(trunk) if isinstance(m, nn.ReLU))
        # the classifier centres its input (x - 0.5) before its trunk
        net = SequentialFeatures(trunk, taps, shift=0.5)
        return LPIPS(net, "the digits classifier's conv-ReLU features (self-bounded on the digits model)").to(device)
    if kind in ("alexnet", "vgg16") and rest:
        net = AlexNetFeatures() if kind == "alexnet" else VGG16Features()
        state = {k[len("features."):]: v for k, v in _read_state_dict(Path(rest)).items() if k.startswith("features.")}
        own = net.trunk.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            shown = ["features." + k for k in missing[:4]] + (["..."] if len(missing) > 4 else [])
            raise OptionError("lpips", f"{rest} lacks {kind}'s trunk weights {shown} (expected a torchvision {kind} "
                                       f"state dict)")
        net.trunk.load_state_dict({k: state[k] for k in own})
        return LPIPS(net, f"{kind} ({rest})").to(device)
    if rest:
        try:
            fn = getattr(importlib.import_module(kind), rest)
        except (ImportError, AttributeError) as e:
            raise OptionError("lpips", f"cannot import {spec!r} ({e})") from None
        net = fn()
        if not isinstance(net, nn.Module):
            raise OptionTypeError("lpips", f"{spec} returned a {type(net).__name__}, expected an nn.Module")
        return LPIPS(net, spec).to(device)
    raise OptionError("lpips", f"expected {_SPECS}, got {spec!r}")


def lpips_project(lpips: LPIPS, x: torch.Tensor, x_adv: torch.Tensor, bound: float, *, steps: int = 10):
    """Bring x_adv inside the LPIPS ball around x by bisection on ``x + lam (x_adv - x)``, lam in [0, 1] (Laidlaw et
    al.'s ``BisectionPerceptualProjection``), keeping the largest lam whose distance was *measured* <= bound, so the
    returned images satisfy the bound exactly as measured. Samples already inside are returned unchanged.

    x, x_adv: (B, C, H, W) in [0, 1]. Returns (projected (B, C, H, W), its distance (B,), lam (B,): 1 where nothing
    moved)."""
    with torch.no_grad():
        phi_x = lpips.features(x)
        d = lpips(x, x_adv, phi1=phi_x)
        outside = d.double() > bound  # in float64: float32(bound) can lie above the bound
        if not bool(outside.any()):
            return x_adv, d, torch.ones_like(d)
        lo = torch.zeros_like(d)
        hi = torch.ones_like(d)
        d_lo = torch.zeros_like(d)
        shape = (-1, *[1] * (x.dim() - 1))
        for _ in range(steps):
            mid = (lo + hi) / 2
            dm = lpips(x, x + mid.reshape(shape) * (x_adv - x), phi1=phi_x)
            ok = dm.double() <= bound
            lo, d_lo = torch.where(ok, mid, lo), torch.where(ok, dm, d_lo)
            hi = torch.where(ok, hi, mid)
        # the same expression as the measured points, so a projected image is exactly one whose distance was measured
        projected = torch.where(outside.reshape(shape), x + lo.reshape(shape) * (x_adv - x), x_adv)
        return projected, torch.where(outside, d_lo, d), torch.where(outside, lo, torch.ones_like(lo))
