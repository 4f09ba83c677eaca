"""A small CNN classifier for the 16x16 digits of the embedded default model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._validate import check_int

__all__ = ["DigitsClassifier"]


class DigitsClassifier(nn.Module):
    """conv-bn-relu x2, max-pool, conv-bn-relu x2, max-pool, then a two-layer head.

    Input: (B, in_channels, R, R) images in [0, 1] (R divisible by 4; 16 for the shipped weights); output: logits
    (B, num_classes).  Inputs are centred internally (``x - 0.5``), so callers pass [0, 1] images unchanged.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, resolution: int = 16,
                 channels: tuple[int, int] = (32, 64), hidden: int = 128, dropout: float = 0.3):
        super().__init__()
        in_channels, num_classes, resolution, hidden = (check_int(n, v) for n, v in (
            ("in_channels", in_channels), ("num_classes", num_classes), ("resolution", resolution), ("hidden", hidden)))
        if resolution % 4 != 0:
            raise ValueError(f"resolution: expected a multiple of 4, got {resolution}")
        c1, c2 = (check_int("channels", c) for c in channels)
        self.config: dict[str, Any] = dict(in_channels=in_channels, num_classes=num_classes,
                                           resolution=resolution, channels=[c1, c2], hidden=hidden,
                                           dropout=float(dropout))

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, c1), *block(c1, c1), nn.MaxPool2d(2),
            *block(c1, c2), *block(c2, c2), nn.MaxPool2d(2),
        )
        side = resolution // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DigitsClassifier:
        cfg = dict(config)
        if "channels" in cfg:
            cfg["channels"] = tuple(cfg["channels"])
        return cls(**cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5))
