"""ResNets with the official key names: torchvision's ImageNet ResNets and DiffPure's CIFAR-10 ResNet-50.

* ``ResNet(stem="imagenet")``: torchvision ``models/resnet.py`` (``resnet18/50/101``, ``wide_resnet50_2``): a 7x7
  stride-2 stem with max-pooling, four layers of ``BasicBlock`` or ``Bottleneck`` (the "V1.5" variant: the stride
  sits on the 3x3 ``conv2``), inner width ``planes * width_per_group / 64 * groups``, global average pool, ``fc``.
  Shortcut modules are ``downsample`` (``Sequential(conv 1x1 with the stride, BN)``).
* ``ResNet(stem="cifar")``: DiffPure's ``classifiers/cifar10_resnet.py`` ``ResNet50()`` (kuangliu's CIFAR ResNet):
  a 3x3 stride-1 stem without pooling, Bottlenecks ``[3, 4, 6, 3]``, shortcut modules named ``shortcut``, a 4x4
  average pool (global at 32x32) and ``linear``.

Inputs are already normalised (the wrapper's job, see ``classifiers``); outputs are logits. Block type, block counts,
widths and class count are read from a state dict by ``architecture_from_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..._validate import check_choice, check_int
from ._infer import count_indexed, need

__all__ = ["ResNet"]

_PLANES = (64, 128, 256, 512)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, shortcut: str, width_per_group: int, groups: int):
        super().__init__()
        if width_per_group != 64 or groups != 1:
            raise ValueError("width_per_group: a BasicBlock ResNet has width_per_group 64 and groups 1 "
                             f"(torchvision's rule), got {width_per_group} and {groups}")
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._shortcut = _add_shortcut(self, shortcut, cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self._shortcut is None else getattr(self, self._shortcut)(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, shortcut: str, width_per_group: int, groups: int):
        super().__init__()
        width = planes * width_per_group // 64 * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self._shortcut = _add_shortcut(self, shortcut, cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self._shortcut is None else getattr(self, self._shortcut)(x)))


def _add_shortcut(block: nn.Module, name: str, cin: int, cout: int, stride: int) -> str | None:
    """Adds the projection shortcut (1x1 conv with the stride, then BN) under ``name`` where the stride or the width
    changes, as both official codes do; returns its name, or None for the identity."""
    if stride == 1 and cin == cout:
        return None
    block.add_module(name, nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))
    return name


_BLOCKS = {"basic": _BasicBlock, "bottleneck": _Bottleneck}
_STEMS = {"imagenet": ("downsample", "fc"), "cifar": ("shortcut", "linear")}


class ResNet(nn.Module):
    """A torchvision-style (``stem="imagenet"``) or CIFAR (``stem="cifar"``) ResNet.

    block: ``"basic"`` or ``"bottleneck"``; layers: blocks per layer (``[2, 2, 2, 2]`` ResNet-18, ``[3, 4, 6, 3]``
    ResNet-50 and WRN-50-2, ``[3, 4, 23, 3]`` ResNet-101); width_per_group: 64, or 128 for Wide-ResNet-50-2 (it
    doubles the Bottleneck's inner 1x1/3x3 widths only); groups: 1 (ResNeXt: more). BatchNorm eps 1e-5.
    """

    def __init__(self, *, block: str = "bottleneck", layers=(3, 4, 6, 3), num_classes: int = 1000,
                 width_per_group: int = 64, groups: int = 1, stem: str = "imagenet"):
        super().__init__()
        check_choice("block", block, tuple(_BLOCKS))
        check_choice("stem", stem, tuple(_STEMS))
        layers = [check_int("layers", n) for n in layers]
        if len(layers) != 4:
            raise ValueError(f"layers: expected 4 block counts, got {layers}")
        num_classes = check_int("num_classes", num_classes)
        width_per_group, groups = check_int("width_per_group", width_per_group), check_int("groups", groups)
        cls, (shortcut, head) = _BLOCKS[block], _STEMS[stem]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip(_PLANES, layers)):
            blocks = []
            for j in range(n):
                blocks.append(cls(cin, planes, (1 if i == 0 else 2) if j == 0 else 1, shortcut, width_per_group,
                                  groups))
                cin = planes * cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.add_module(head, nn.Linear(cin, num_classes))
        self.stem, self.head = stem, head
        self.input_size = (3, 32, 32) if stem == "cifar" else (3, None, None)  # torchvision pools adaptively
        self.architecture = dict(block=block, layers=layers, num_classes=num_classes,
                                 width_per_group=width_per_group, groups=groups, stem=stem)

    @staticmethod
    def architecture_from_state_dict(state, where: str = "", *, stem: str = "imagenet") -> dict:
        """block, layers, width_per_group, groups and num_classes read from the keys and shapes."""
        head = _STEMS[stem][1]
        layers = [count_indexed(state, f"layer{i}.{{}}.conv1.weight", where) for i in range(1, 5)]
        block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        arch = dict(block=block, layers=layers, num_classes=need(state, f"{head}.weight", where).shape[0], stem=stem)
        if block == "bottleneck":
            conv2 = need(state, "layer1.0.conv2.weight", where)   # (width, width / groups, 3, 3), planes 64
            groups = conv2.shape[0] // conv2.shape[1]
            arch.update(groups=groups, width_per_group=conv2.shape[0] // groups)
        return arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            out = F.max_pool2d(out, 3, stride=2, padding=1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1) if self.stem == "imagenet" else F.avg_pool2d(out, 4)
        return getattr(self, self.head)(out.flatten(1))
