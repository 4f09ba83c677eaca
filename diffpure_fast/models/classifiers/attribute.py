"""The CelebA-HQ attribute classifiers of DiffPure (``classifiers/attribute_net.py``, ``attribute_classifier.py``,
from gan-ensembling): a StyleGAN-style discriminator ``D(num_channels=3, resolution=256, fixed_size=True,
use_mbstd=False)`` with one output logit ``l``, returned as DiffPure's two logits ``[l, -l]``.

* Every convolution and linear layer has an equalised learning rate: the bias-free result times
  ``gain / sqrt(fan_in)`` (gain sqrt(2), 1 for ``dense1``), plus ``wscale.b``. Activations are LeakyReLU(0.2).
* ``fromrgb_lod0``: 1x1 conv 3 -> nf(log2 R - 1), activation. Blocks ``<r>x<r>`` for r = R .. 8:
  ``act(avgpool2x2(conv1(act(conv0(x)))))`` (the pooling before the activation); ``4x4``: ``act(conv)``, flatten
  in (C, H, W) order, ``act(dense0)``, ``dense1``. Widths nf(s) = min(8192 / 2^s, 512).
* ``ClassifierWrapper.forward``: the network sees ``(x - 0.5) / 0.5`` (the wrapper's normalisation here), block-
  averaged down to R when larger (a whole factor, as ``downsample`` asserts).

gan-ensembling trained with ``BCEWithLogits(l, 1 - label)``: a negative ``l`` means the attribute is present, so
class 1 of ``[l, -l]`` is "attribute present".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..._validate import OptionError, check_int

__all__ = ["AttributeClassifier"]


_GAIN = math.sqrt(2.0)  # equal to the official np.sqrt(2) in float64


def _nf(stage: int) -> int:
    # D's fmap_base 8192, fmap_decay 1.0, fmap_max 512
    return min(int(8192 / (2.0 ** stage)), 512)


class _WScale(nn.Module):
    """``x * gain / sqrt(fan_in) + b``: the key ``wscale.b``."""

    def __init__(self, size: int, fan_in: int, gain: float):
        super().__init__()
        self.scale = gain / math.sqrt(fan_in)  # a Python float, as the official numpy float64
        self.b = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.b.view(1, -1, 1, 1) if x.dim() == 4 else self.b.view(1, -1)
        return x * self.scale + b


class _WConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, padding: int, gain: float = _GAIN):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.wscale = _WScale(cout, cin * k * k, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wscale(self.conv(x))


class _WLinear(nn.Module):
    def __init__(self, cin: int, cout: int, gain: float = _GAIN):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.wscale = _WScale(cout, cin, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wscale(self.linear(x))


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class _FromRGB(nn.Module):
    def __init__(self, cout: int):
        super().__init__()
        self.conv = _WConv(3, cout, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.conv(x))


class _DownBlock(nn.Module):
    def __init__(self, cin: int, c0: int, c1: int):
        super().__init__()
        self.conv0 = _WConv(cin, c0, 3, 1)
        self.conv1 = _WConv(c0, c1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(F.avg_pool2d(self.conv1(_act(self.conv0(x))), 2))


class _Prediction(nn.Module):
    def __init__(self, cin: int, c_dense0: int, c_dense1: int):
        super().__init__()
        self.conv = _WConv(cin, c_dense0, 3, 1)
        self.dense0 = _WLinear(c_dense0 * 16, c_dense1)
        self.dense1 = _WLinear(c_dense1, 1, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _act(self.conv(x)).flatten(1)
        return self.dense1(_act(self.dense0(x)))


class AttributeClassifier(nn.Module):
    """``D`` at ``resolution`` R (a power of two >= 8; 256 for every released attribute) returning ``[l, -l]``
    (B, 2) for already normalised inputs (B, 3, R k, R k), block-averaged to R when k > 1."""

    def __init__(self, resolution: int = 256):
        super().__init__()
        resolution = check_int("resolution", resolution, low=8)
        log2 = int(math.log2(resolution))
        if 2 ** log2 != resolution:
            raise ValueError(f"resolution: expected a power of two, got {resolution}")
        self.register_buffer("lod_in", torch.tensor(0.0, dtype=torch.float64))  # in the files; unused (fixed size)
        self.fromrgb_lod0 = _FromRGB(_nf(log2 - 1))
        self.resolutions = [2 ** r for r in range(log2, 2, -1)]
        for r in range(log2, 2, -1):
            self.add_module(f"{2 ** r}x{2 ** r}", _DownBlock(_nf(r - 1), _nf(r - 1), _nf(r - 2)))
        self.add_module("4x4", _Prediction(_nf(1), _nf(1), _nf(0)))
        self.resolution = resolution
        self.input_size = (3, resolution, resolution)
        self.input_multiple = True  # larger inputs are block-averaged down, by a whole factor
        self.architecture = dict(resolution=resolution)

    @staticmethod
    def architecture_from_state_dict(state, where: str = "") -> dict:
        """The resolution as ``attribute_net.max_res_from_state_dict`` reads it: 2^(i-1) for the first i in 3..11
        without a ``<2^i>x<2^i>.conv0.conv.weight`` key."""
        i = next((i for i in range(3, 12) if f"{2 ** i}x{2 ** i}.conv0.conv.weight" not in state), 11)
        if i == 3:
            raise OptionError("checkpoint", "missing key '8x8.conv0.conv.weight', which the attribute network's "
                                            "resolution is read from", where=where)
        return dict(resolution=2 ** (i - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        if size != self.resolution:  # DiffPure's downsample(): average factor x factor blocks
            factor = size // self.resolution
            b, c = x.shape[:2]
            x = x.view(b, c, size // factor, factor, size // factor, factor).mean(dim=[3, 5])
        x = self.fromrgb_lod0(x)
        for r in self.resolutions:
            x = getattr(self, f"{r}x{r}")(x)
        logit = getattr(self, "4x4")(x)
        return torch.cat([logit, -logit], dim=1)
