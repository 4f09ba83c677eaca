"""SDEdit's DDPM UNet (the network of DiffPure's CelebA-HQ runner), compatible with ``celeba_hq.ckpt``.

Written for this project from the published architecture of ``ermongroup/SDEdit`` ``models/diffusion.py`` (vendored
unchanged by DiffPure as ``ddpm/unet_ddpm.py``), itself the PyTorch port of Ho et al.'s DDPM UNet. Matches the
official module names and nesting, so the official plain state dict loads as is: ``temb.dense.{0,1}``, ``conv_in``,
``down.<level>.block.<i>`` / ``.attn.<i>`` / ``.downsample.conv``, ``mid.block_1`` / ``attn_1`` / ``block_2``,
``up.<level>.block.<i>`` / ``.attn.<i>`` / ``.upsample.conv``, ``norm_out``, ``conv_out``; residual blocks
``norm1, conv1, temb_proj, norm2, conv2`` and ``nin_shortcut`` (1x1) when the width changes (the official
``Model`` never builds its ``conv_shortcut`` variant); attention ``norm, q, k, v, proj_out`` (1x1 convolutions, one
head).

Numerics as the official: the ``[sin, cos]`` timestep embedding of the integer step (``log(10000) / (half - 1)``
frequencies), swish, ``GroupNorm(32, C, eps=1e-6)``, downsampling by a stride-2 3x3 convolution after padding the
right and bottom by one (or 2x2 average pooling without ``resamp_with_conv``), nearest-neighbour upsampling then a
3x3 convolution, attention at the resolutions in ``attn_resolutions`` in every block of that level, and the skip
connections pushed in the down path and popped in the up path. Output: epsilon (``out_ch`` channels).

The configuration is DiffPure's ``configs/celeba.yml`` (``data.image_size``; ``model.ch``, ``out_ch``, ``ch_mult``,
``num_res_blocks``, ``attn_resolutions``, ``dropout``, ``in_channels``, ``resamp_with_conv``): every dimension comes
from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_bool, check_float, check_int

__all__ = ["CELEBAHQ_DDPM_CONFIG", "DDPMUNet", "ddpm_timestep_embedding"]

# DiffPure's configs/celeba.yml (SDEdit's CelebA-HQ 256x256 model).
CELEBAHQ_DDPM_CONFIG: dict[str, Any] = {
    "data": {"dataset": "CelebA_HQ", "category": "celeba", "image_size": 256, "channels": 3, "logit_transform": False,
             "uniform_dequantization": False, "gaussian_dequantization": False, "random_flip": True,
             "rescaled": True, "num_workers": 32},
    "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4, 4],
              "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0, "var_type": "fixedsmall",
              "ema_rate": 0.999, "ema": True, "resamp_with_conv": True},
    "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
    "sampling": {"batch_size": 8, "last_only": True},
}


def ddpm_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM's sinusoidal embedding (B, dim) of the steps (B,): ``[sin, cos]`` of ``t exp(-k log(10000) / (half -
    1))``, zero-padded to an odd dim."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      * -(math.log(10000) / (half - 1)))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv3(cin, cout)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2, self.dropout, self.conv2 = _norm(cout), nn.Dropout(dropout), _conv3(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H x W positions, 1x1-convolution projections, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=2)   # (b, query, key)
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sec = config.get(name)
    if not isinstance(sec, Mapping):
        raise ValueError(f"config['{name}']: expected a dict (the layout of DiffPure's configs/celeba.yml), got "
                         f"{type(sec).__name__}")
    return sec


def _field(sec: Mapping[str, Any], where: str, key: str):
    if key not in sec:
        raise ValueError(f"config['{where}']['{key}']: missing (the layout of DiffPure's configs/celeba.yml)")
    return sec[key]


class DDPMUNet(nn.Module):
    """The UNet ``net(x, t) -> eps``: x (B, in_channels, S, S) in [-1, 1], t (B,) integer steps in [0, 1000)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult, num_res_blocks: int, attn_resolutions, dropout: float,
                 in_channels: int, resolution: int, resamp_with_conv: bool = True):
        super().__init__()
        # one integer rule (diffpure_fast._validate): a config's 2.0 is refused, never truncated
        ch, out_ch = check_int("ch", ch), check_int("out_ch", out_ch)
        in_channels = check_int("in_channels", in_channels)
        num_res_blocks, resolution = check_int("num_res_blocks", num_res_blocks), check_int("resolution", resolution)
        ch_mult = tuple(check_int("ch_mult", m) for m in ch_mult)
        attn = {check_int("attn_resolutions", r) for r in attn_resolutions}
        dropout = check_float("dropout", dropout, low=0.0, high=1.0)
        self.ch, self.in_channels, self.image_size = ch, in_channels, resolution
        self.num_res_blocks = num_res_blocks
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = _conv3(in_channels, ch)

        res, cin = resolution, ch
        skips = [ch]                      # channels of every tensor the down path pushes
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * mult, temb_ch, dropout))
                cin = ch * mult
                if res in attn:
                    level.attn.append(AttnBlock(cin))
                skips.append(cin)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cin, resamp_with_conv)
                res //= 2
                skips.append(cin)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin, temb_ch, dropout)

        up = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cin + skips.pop(), ch * ch_mult[i], temb_ch, dropout))
                cin = ch * ch_mult[i]
                if res in attn:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin, resamp_with_conv)
                res *= 2
            up.append(level)
        self.up = nn.ModuleList(reversed(up))   # indexed by level, as the official (which prepends)
        self.norm_out = _norm(cin)
        self.conv_out = _conv3(cin, out_ch)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DDPMUNet:
        """The network of a celeba.yml-style config (a dict with ``data`` and ``model`` sections)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config: expected a dict in the layout of DiffPure's configs/celeba.yml, got "
                             f"{type(config).__name__}")
        data, model = _section(config, "data"), _section(config, "model")
        return cls(**{k: _field(model, "model", k) for k in ("ch", "out_ch", "ch_mult", "num_res_blocks",
                                                             "attn_resolutions", "dropout", "in_channels")},
                   resolution=_field(data, "data", "image_size"),
                   resamp_with_conv=check_bool("resamp_with_conv", model.get("resamp_with_conv", True)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(f"x: the network was built for {self.image_size}x{self.image_size} images, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](ddpm_timestep_embedding(t, self.ch))))
        hs = [self.conv_in(x)]
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(hs[-1], temb)
                hs.append(level.attn[i](h) if len(level.attn) else h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
