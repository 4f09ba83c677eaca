"""The WideResNets of DiffPure's CIFAR-10 classifiers, with the official key names (so official files load strictly).

* ``WideResNet``: the TRADES-style pre-activation WideResNet of RobustBench (``model_zoo/architectures/wide_resnet.py``,
  the ``Standard`` WRN-28-10 entry) and of DiffPure's ``classifiers/cifar10_resnet.py`` (``WideResNet_70_16_dropout``:
  the same keys and computation, with dropout 0.3 between ``relu(bn2(.))`` and ``conv2``, a no-op in eval mode).
* ``DMWideResNet``: DeepMind's WideResNet (Gowal et al. 2020) as RobustBench's ``dm_wide_resnet.py`` writes it:
  TensorFlow "SAME" padding (right and bottom only) before the strided 3x3 convolutions, Swish activations.

Both take (B, 3, 32, 32) already normalised inputs (the normalisation is the wrapper's, see ``classifiers``) and
return logits (B, num_classes). Sizes are constructor arguments; ``from_state_dict`` infers them from the keys and
shapes of a checkpoint, so one class loads the small conformance networks and the real ones alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..._validate import check_float, check_int
from ._infer import count_indexed, need

__all__ = ["DMWideResNet", "WideResNet"]


class _Block(nn.Module):
    """Pre-activation basic block (TRADES ``BasicBlock``). Where the width changes, the shortcut takes the
    *activated* input ``relu(bn1(x))``; elsewhere the raw ``x``."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        if not self.equal:
            x = act
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return (x if self.equal else self.convShortcut(x)) + out


class _Group(nn.Module):
    """``NetworkBlock``: its blocks under ``.layer`` (the key ``block1.layer.0...``)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[_Block(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _blocks_per_group(depth: int) -> int:
    depth = check_int("depth", depth, low=10)
    if (depth - 4) % 6:
        raise ValueError(f"depth: a WideResNet has depth 6 n + 4 (n blocks per group), got {depth}")
    return (depth - 4) // 6


class WideResNet(nn.Module):
    """TRADES/RobustBench WideResNet-``depth``-``widen_factor``: widths [16, 16k, 32k, 64k], (depth - 4) / 6 blocks
    per group, group strides 1, 2, 2; head ``relu(bn1)``, 8x8 average pool, ``fc``. BatchNorm eps 1e-5.

    dropout: DiffPure's ``dropRate`` (0.3 for ``WideResNet_70_16_dropout``; no effect in eval mode).
    bias_last: whether ``fc`` has a bias (TRADES' ``bias_last``; True in every DiffPure file).
    """

    input_size = (3, 32, 32)

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0,
                 bias_last: bool = True):
        super().__init__()
        n = _blocks_per_group(depth)
        k = check_int("widen_factor", widen_factor)
        num_classes = check_int("num_classes", num_classes)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0)
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _Group(n, widths[0], widths[1], 1, dropout)
        self.block2 = _Group(n, widths[1], widths[2], 2, dropout)
        self.block3 = _Group(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes, bias=bool(bias_last))
        self.architecture = dict(depth=depth, widen_factor=k, num_classes=num_classes, dropout=dropout,
                                 bias_last=bool(bias_last))

    @staticmethod
    def architecture_from_state_dict(state, where: str = "") -> dict:
        """depth, widen_factor, num_classes and bias_last read from the keys and shapes."""
        n = count_indexed(state, "block1.layer.{}.conv1.weight", where)
        first = need(state, "block1.layer.0.conv1.weight", where)
        fc = need(state, "fc.weight", where)
        return dict(depth=6 * n + 4, widen_factor=first.shape[0] // 16, num_classes=fc.shape[0],
                    bias_last="fc.bias" in state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


class _DMBlock(nn.Module):
    """RobustBench ``dm_wide_resnet._Block``: ``conv_0`` has padding 0 after an explicit pad, (1, 1, 1, 1) at
    stride 1 and (0, 1, 0, 1) at stride 2 (TensorFlow "SAME")."""

    def __init__(self, cin: int, cout: int, stride: int, act):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.conv_1 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if self.has_shortcut else None
        self.stride, self.act = stride, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.act(self.batchnorm_0(x))
        if self.has_shortcut:
            x = v
        v = F.pad(v, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.act(self.batchnorm_1(self.conv_0(v))))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class _DMGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, act):
        super().__init__()
        self.block = nn.Sequential(*[_DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, act)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _swish(x: torch.Tensor) -> torch.Tensor:
    # RobustBench's Swish is x * sigmoid(x) in its own autograd Function; F.silu computes the same function
    return x * torch.sigmoid(x)


_ACTIVATIONS = {"swish": _swish, "relu": F.relu}


class DMWideResNet(nn.Module):
    """DeepMind's WideResNet-``depth``-``width`` (RobustBench ``DMWideResNet``, ``activation_fn=Swish`` in DiffPure's
    ``cifar10-wideresnet-70-16``): widths [16, 16w, 32w, 64w], (depth - 4) / 6 blocks per group, strides 1, 2, 2;
    head ``act(batchnorm)``, 8x8 average pool, ``logits``. The CIFAR-10 normalisation its forward starts with is the
    wrapper's here (same constants, same arithmetic)."""

    input_size = (3, 32, 32)

    def __init__(self, depth: int = 70, width: int = 16, num_classes: int = 10, activation: str = "swish"):
        super().__init__()
        n = _blocks_per_group(depth)
        w = check_int("width", width)
        num_classes = check_int("num_classes", num_classes)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        widths = [16, 16 * w, 32 * w, 64 * w]
        self.init_conv = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(*[_DMGroup(n, widths[g], widths[g + 1], 1 if g == 0 else 2, act)
                                     for g in range(3)])
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.logits = nn.Linear(widths[3], num_classes)
        self.act = act
        self.architecture = dict(depth=depth, width=w, num_classes=num_classes, activation=activation)

    @staticmethod
    def architecture_from_state_dict(state, where: str = "") -> dict:
        n = count_indexed(state, "layer.0.block.{}.conv_0.weight", where)
        first = need(state, "layer.0.block.0.conv_0.weight", where)
        return dict(depth=6 * n + 4, width=first.shape[0] // 16, num_classes=need(state, "logits.weight", where)
                    .shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.batchnorm(self.layer(self.init_conv(x))))
        return self.logits(F.avg_pool2d(out, 8).flatten(1))
