"""NCSN++ / DDPM++ score network, compatible with score_sde's ``checkpoint_*.pth`` files.

Written for this project from the published architecture of ``yang-song/score_sde_pytorch`` (``models/ncsnpp.py``,
``layerspp.py``, ``layers.py``), which DiffPure vendors unchanged. What must match the official code, and does:

* module names and nesting (``all_modules.<i>.GroupNorm_0.weight``, ``NIN_0.W``, ``Conv_2``, ...), so a state dict
  loads with ``strict=True``;
* the order of ``model.parameters()``, because the EMA of a checkpoint (``ema.shadow_params``) is a plain list in
  that order (see :meth:`NCSNpp.ema_parameters`);
* the forward numerics: sinusoidal embedding with ``sin`` first, ``GroupNorm(min(C // 4, 32), eps=1e-6)``, swish,
  residual sums divided by ``sqrt(2)`` when ``skip_rescale``, nearest / 2x2-mean resampling inside BigGAN blocks,
  pad-then-stride-2 convolution for DDPM downsampling, channel-mixing "NIN" layers as ``x @ W + b``.

Differences that do not change results: the block structure is resolved once at construction (the official forward
tests ``h.shape[-1] in attn_resolutions`` at run time; with inputs of the configured ``image_size`` this is the same
choice), so the forward has no data-dependent Python control flow and is ``torch.compile`` friendly; spatial
attention runs through ``scaled_dot_product_attention``; nothing uses ``.view`` on possibly non-contiguous tensors, so
``channels_last`` inputs and weights work.

Not supported: FIR resampling (``fir=True``) raises ``ValueError``; DiffPure's CIFAR-10 model has ``fir: False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_bool, check_int

__all__ = ["NCSNPP_CIFAR10_CONFIG", "NCSNpp", "ncsnpp_kwargs_from_config"]

_SQRT2 = math.sqrt(2.0)

# DiffPure's configs/cifar10.yml (score_sde's vp/cifar10_ddpmpp_deep_continuous), as the yaml-as-dict.
NCSNPP_CIFAR10_CONFIG: dict[str, Any] = {
    "data": {"dataset": "CIFAR10", "category": "cifar10", "image_size": 32, "num_channels": 3, "random_flip": True,
             "centered": True, "uniform_dequantization": False},
    "model": {"sigma_min": 0.01, "sigma_max": 50, "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0,
              "dropout": 0.1, "name": "ncsnpp", "scale_by_sigma": False, "ema_rate": 0.9999,
              "normalization": "GroupNorm", "nonlinearity": "swish", "nf": 128, "ch_mult": [1, 2, 2, 2],
              "num_res_blocks": 8, "attn_resolutions": [16], "resamp_with_conv": True, "conditional": True,
              "fir": False, "fir_kernel": [1, 3, 3, 1], "skip_rescale": True, "resblock_type": "biggan",
              "progressive": "none", "progressive_input": "none", "progressive_combine": "sum",
              "attention_type": "ddpm", "init_scale": 0.0, "embedding_type": "positional", "fourier_scale": 16,
              "conv_size": 3},
    "training": {"sde": "vpsde", "continuous": True, "reduce_mean": True, "n_iters": 950001},
}


# ----------------------------------------------------------------------------------------------------------------
# initialisation (DDPM's "variance scaling, fan_avg, uniform"; scale 0 means 1e-10 as in score_sde)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _default_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    scale = 1e-10 if scale == 0 else scale
    shape = weight.shape
    receptive = math.prod(shape) / shape[1] / shape[0]
    fan_avg = (shape[1] * receptive + shape[0] * receptive) / 2
    bound = math.sqrt(3 * scale / fan_avg)
    return weight.uniform_(-bound, bound)


def _conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int | None = None,
          init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel // 2 if padding is None else padding))
    _default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_f: int, out_f: int) -> nn.Linear:
    lin = nn.Linear(in_f, out_f)
    _default_init_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _activation(name: str) -> nn.Module:
    name = str(name).lower()
    if name == "swish":
        return nn.SiLU()
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    raise ValueError(f"nonlinearity: expected one of 'swish', 'elu', 'relu', 'lrelu', got {name!r}")


def sinusoidal_embedding(labels: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """score_sde's ``get_timestep_embedding``: ``[sin, cos]`` of ``labels * exp(-k log(max) / (half - 1))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=labels.device)
                      * -(math.log(max_positions) / (half - 1)))
    args = labels.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _downsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2, stride=2)


# ----------------------------------------------------------------------------------------------------------------
# layers (attribute names and definition order are those of the official modules)
# ----------------------------------------------------------------------------------------------------------------
class NIN(nn.Module):
    """Per-pixel channel mixing ``y = x^T W + b`` with ``W`` of shape (in, out)."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(_default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x.permute(0, 2, 3, 1), self.W) + self.b
        return y.permute(0, 3, 1, 2)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of ``log(label)``; ``W`` is frozen (``requires_grad=False``, outside the EMA)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class Combine(nn.Module):
    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        self.Conv_0 = _conv(dim1, dim2, 1)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        if self.method == "cat":
            return torch.cat([h, y], dim=1)
        return h + y


class AttnBlockpp(nn.Module):
    """Single-head spatial self-attention over all H*W positions, scale ``C^-1/2``."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.GroupNorm_0(x).permute(0, 2, 3, 1).reshape(b, 1, hh * ww, c)     # (B, 1, HW, C)
        q = torch.matmul(h, self.NIN_0.W) + self.NIN_0.b
        k = torch.matmul(h, self.NIN_1.W) + self.NIN_1.b
        v = torch.matmul(h, self.NIN_2.W) + self.NIN_2.b
        a = F.scaled_dot_product_attention(q, k, v, scale=float(c) ** -0.5)
        a = torch.matmul(a, self.NIN_3.W) + self.NIN_3.b
        a = a.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        if self.skip_rescale:
            return (x + a) / _SQRT2
        return x + a


class Upsample(nn.Module):
    """Nearest 2x upsampling, then an optional 3x3 convolution (``resblock_type='ddpm'``; pyramid upsampling)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv:
            self.Conv_0 = _conv(in_ch, out_ch, 3)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _upsample2x(x)
        if self.with_conv:
            h = self.Conv_0(h)
        return h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding right/bottom by one, or 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv:
            self.Conv_0 = _conv(in_ch, out_ch, 3, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return _downsample2x(x)


class ResnetBlockDDPMpp(nn.Module):
    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 dropout: float = 0.1, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        if temb_dim is not None:
            self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        if in_ch != out_ch:
            self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.NIN_0(x)
        if self.skip_rescale:
            return (x + h) / _SQRT2
        return x + h


class ResnetBlockBigGANpp(nn.Module):
    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.up = up
        self.down = down
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        if temb_dim is not None:
            self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = _conv(in_ch, out_ch, 1)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            h, x = _upsample2x(h), _upsample2x(x)
        elif self.down:
            h, x = _downsample2x(h), _downsample2x(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.Conv_2(x)
        if self.skip_rescale:
            return (x + h) / _SQRT2
        return x + h


# ----------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------
def _choice(name: str, value, allowed) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
    return value


class NCSNpp(nn.Module):
    """score_sde's ``NCSNpp`` (``model.name: ncsnpp``): ``forward(x, labels) -> output`` (epsilon for VP models).

    ``labels`` are the noise-level inputs of score_sde: ``999 t`` (float) for continuous VP models with positional
    embedding; for Fourier embedding, the network embeds ``log(labels)`` (score_sde feeds sigmas there).

    All arguments are plain keywords named as in the official ``config.model`` / ``config.data``; use
    :meth:`from_config` for the yaml-as-dict. Defaults are DiffPure's CIFAR-10 model (``nf=128``, ``ch_mult=(1, 2,
    2, 2)``, 8 blocks per level, attention at 16x16, BigGAN blocks, positional embedding, ``skip_rescale``).
    ``centered=False`` means inputs in [0, 1] which the network maps to [-1, 1] itself (as the official one does).
    """

    def __init__(self, *, image_size: int = 32, num_channels: int = 3, nf: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 8,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, resamp_with_conv: bool = True,
                 conditional: bool = True, fir: bool = False, fir_kernel: Sequence[int] = (1, 3, 3, 1),
                 skip_rescale: bool = True, resblock_type: str = "biggan", progressive: str = "none",
                 progressive_input: str = "none", progressive_combine: str = "sum", init_scale: float = 0.0,
                 embedding_type: str = "positional", fourier_scale: float = 16.0, nonlinearity: str = "swish",
                 centered: bool = True, scale_by_sigma: bool = False, sigma_min: float = 0.01,
                 sigma_max: float = 50.0, num_scales: int = 1000, attention_type: str = "ddpm"):
        super().__init__()
        if fir:
            raise ValueError("fir: fir=True is not supported (FIR up/downsampling is not implemented); "
                             "DiffPure's score_sde configs use fir: False")
        # the package's integer rule (NumPy integers accepted, floats refused, never rounded)
        image_size, num_channels = check_int("image_size", image_size), check_int("num_channels", num_channels)
        nf, num_res_blocks = check_int("nf", nf, low=2), check_int("num_res_blocks", num_res_blocks, low=0)
        num_scales = check_int("num_scales", num_scales)
        ch_mult = tuple(check_int("ch_mult", m) for m in ch_mult)
        if not ch_mult:
            raise ValueError(f"ch_mult: expected a non-empty sequence of positive ints, got {ch_mult}")
        if image_size % (2 ** (len(ch_mult) - 1)):
            raise ValueError(f"image_size: {image_size} is not divisible by 2**(len(ch_mult)-1) = "
                             f"{2 ** (len(ch_mult) - 1)}")
        resblock_type = _choice("resblock_type", resblock_type, ("ddpm", "biggan"))
        progressive = _choice("progressive", progressive, ("none", "output_skip", "residual"))
        progressive_input = _choice("progressive_input", progressive_input, ("none", "input_skip", "residual"))
        combine_method = _choice("progressive_combine", progressive_combine, ("sum", "cat"))
        embedding_type = _choice("embedding_type", embedding_type, ("fourier", "positional"))
        _choice("attention_type", attention_type, ("ddpm",))
        for c in (nf * m for m in ch_mult):
            if c < 4:
                raise ValueError(f"nf, ch_mult: every channel count nf*mult must be >= 4 for GroupNorm(C // 4), "
                                 f"got {c}")

        self.act = act = _activation(nonlinearity)
        sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales,
                                          dtype=torch.float64))
        self.register_buffer("sigmas", sigmas)

        self.image_size = image_size
        self.num_channels = channels = num_channels
        self.nf = nf
        self.ch_mult = ch_mult
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = attn_resolutions = tuple(check_int("attn_resolutions", r) for r in attn_resolutions)
        self.num_resolutions = num_resolutions = len(ch_mult)
        self.all_resolutions = all_res = [self.image_size // (2 ** i) for i in range(num_resolutions)]
        self.conditional = conditional = bool(conditional)
        self.skip_rescale = skip_rescale = bool(skip_rescale)
        self.resblock_type = resblock_type
        self.progressive = progressive
        self.progressive_input = progressive_input
        self.embedding_type = embedding_type
        self.centered = bool(centered)
        self.scale_by_sigma = bool(scale_by_sigma)
        self.config = {"image_size": self.image_size, "num_channels": channels, "nf": nf, "ch_mult": ch_mult,
                           "num_res_blocks": num_res_blocks, "attn_resolutions": attn_resolutions, "dropout": dropout,
                           "resamp_with_conv": resamp_with_conv, "conditional": conditional, "fir": fir,
                           "fir_kernel": tuple(fir_kernel), "skip_rescale": skip_rescale,
                           "resblock_type": resblock_type,
                           "progressive": progressive, "progressive_input": progressive_input,
                           "progressive_combine": combine_method, "init_scale": init_scale,
                           "embedding_type": embedding_type, "fourier_scale": fourier_scale,
                           "nonlinearity": nonlinearity,
                           "centered": self.centered, "scale_by_sigma": self.scale_by_sigma, "sigma_min": sigma_min,
                           "sigma_max": sigma_max, "num_scales": num_scales}

        def resblock(in_ch, out_ch=None, up=False, down=False):
            if resblock_type == "ddpm":
                return ResnetBlockDDPMpp(act, in_ch, out_ch, temb_dim=4 * nf, dropout=dropout,
                                         skip_rescale=skip_rescale, init_scale=init_scale)
            return ResnetBlockBigGANpp(act, in_ch, out_ch, temb_dim=4 * nf, up=up, down=down, dropout=dropout,
                                       skip_rescale=skip_rescale, init_scale=init_scale)

        def attn(ch):
            return AttnBlockpp(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        # parameter-free pyramid resamplers are attributes of the model in the official code (no state)
        if progressive == "output_skip":
            self.pyramid_upsample = Upsample(channels, with_conv=False)
        if progressive_input == "input_skip":
            self.pyramid_downsample = Downsample(channels, with_conv=False)

        modules: list[nn.Module] = []
        # plan: a static list of (op, module index) the forward walks through
        embed: list[tuple[str, int]] = []
        if embedding_type == "fourier":
            embed.append(("fourier", len(modules)))
            modules.append(GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if conditional:
            embed.append(("dense0", len(modules)))
            modules.append(_linear(embed_dim, 4 * nf))
            embed.append(("dense1", len(modules)))
            modules.append(_linear(4 * nf, 4 * nf))

        down: list[tuple[str, int]] = []
        down.append(("conv_in", len(modules)))
        modules.append(_conv(channels, nf, 3))
        hs_c = [nf]
        in_ch = nf
        input_pyramid_ch = channels
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                down.append(("res", len(modules)))
                modules.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if all_res[i_level] in attn_resolutions:
                    down.append(("attn", len(modules)))
                    modules.append(attn(in_ch))
                down.append(("push", -1))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    down.append(("resample", len(modules)))
                    modules.append(Downsample(in_ch, with_conv=resamp_with_conv))
                else:
                    down.append(("res_last", len(modules)))
                    modules.append(resblock(in_ch, down=True))
                if progressive_input == "input_skip":
                    down.append(("input_skip", len(modules)))
                    modules.append(Combine(input_pyramid_ch, in_ch, method=combine_method))
                    if combine_method == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    down.append(("input_residual", len(modules)))
                    modules.append(Downsample(input_pyramid_ch, in_ch, with_conv=True))
                    input_pyramid_ch = in_ch
                down.append(("push", -1))
                hs_c.append(in_ch)

        in_ch = hs_c[-1]
        mid = [len(modules), len(modules) + 1, len(modules) + 2]
        modules.append(resblock(in_ch))
        modules.append(attn(in_ch))
        modules.append(resblock(in_ch))

        up: list[tuple[str, int]] = []
        pyramid_ch = 0
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                up.append(("res_cat", len(modules)))
                modules.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if all_res[i_level] in attn_resolutions:
                up.append(("attn", len(modules)))
                modules.append(attn(in_ch))
            if progressive != "none":
                if i_level == num_resolutions - 1:
                    up.append(("pyramid_first", len(modules)))
                    modules.append(nn.GroupNorm(min(in_ch // 4, 32), in_ch, eps=1e-6))
                    if progressive == "output_skip":
                        modules.append(_conv(in_ch, channels, 3, init_scale=init_scale))
                        pyramid_ch = channels
                    else:
                        modules.append(_conv(in_ch, in_ch, 3))
                        pyramid_ch = in_ch
                elif progressive == "output_skip":
                    up.append(("pyramid_output_skip", len(modules)))
                    modules.append(nn.GroupNorm(min(in_ch // 4, 32), in_ch, eps=1e-6))
                    modules.append(_conv(in_ch, channels, 3, init_scale=init_scale))
                    pyramid_ch = channels
                else:
                    up.append(("pyramid_residual", len(modules)))
                    modules.append(Upsample(pyramid_ch, in_ch, with_conv=True))
                    pyramid_ch = in_ch
            if i_level != 0:
                if resblock_type == "ddpm":
                    up.append(("resample", len(modules)))
                    modules.append(Upsample(in_ch, with_conv=resamp_with_conv))
                else:
                    up.append(("res", len(modules)))
                    modules.append(resblock(in_ch, up=True))
        assert not hs_c

        out: list[int] = []
        if progressive != "output_skip":
            out = [len(modules), len(modules) + 1]
            modules.append(nn.GroupNorm(min(in_ch // 4, 32), in_ch, eps=1e-6))
            modules.append(_conv(in_ch, channels, 3, init_scale=init_scale))

        self.all_modules = nn.ModuleList(modules)
        self._embed_plan = tuple(embed)
        self._dense_idx = tuple(i for op, i in embed if op.startswith("dense"))
        self._down_plan = tuple(down)
        self._mid_plan = tuple(mid)
        self._up_plan = tuple(up)
        self._out_plan = tuple(out)

    # ---- construction from the official config format ----
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NCSNpp:
        """Build from score_sde's config as a dict (``config['model']``, ``config['data']``), e.g. DiffPure's
        ``configs/cifar10.yml`` loaded with ``yaml.safe_load``. ``ml_collections.ConfigDict`` objects work too."""
        return cls(**ncsnpp_kwargs_from_config(config))

    # ---- EMA support ----
    def ema_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) in ``model.parameters()`` order, restricted to the parameters an official
        ``ExponentialMovingAverage`` tracks (it keeps ``p.requires_grad`` ones; only the Fourier projection's
        ``W`` is frozen by design). Uses the names, not the current ``requires_grad`` flags, so a model frozen
        with ``requires_grad_(False)`` still lines up with ``shadow_params``."""
        frozen = {f"all_modules.{i}.W" for op, i in self._embed_plan if op == "fourier"}
        return [(n, p) for n, p in self.named_parameters() if n not in frozen]

    # ---- forward ----
    def forward(self, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
        m = self.all_modules
        in_dtype = x.dtype
        param_dtype = m[self._down_plan[0][1]].weight.dtype
        if time_cond.dim() == 0:
            time_cond = time_cond.expand(x.shape[0])

        if self.embedding_type == "fourier":
            temb = m[self._embed_plan[0][1]](torch.log(time_cond))
        else:
            temb = sinusoidal_embedding(time_cond, self.nf)
        if self.conditional:
            dense0, dense1 = m[self._dense_idx[0]], m[self._dense_idx[1]]
            temb = dense1(self.act(dense0(temb.to(dense0.weight.dtype))))
        else:
            temb = None

        if not self.centered:
            x = 2 * x - 1.0
        x = x.to(param_dtype)

        input_pyramid = x
        hs: list[torch.Tensor] = []
        h = x
        for op, i in self._down_plan:
            if op == "conv_in":
                h = m[i](x)
                hs.append(h)
            elif op == "res":
                h = m[i](hs[-1], temb)
            elif op == "attn":
                h = m[i](h)
            elif op == "push":
                hs.append(h)
            elif op == "resample":
                h = m[i](hs[-1])
            elif op == "res_last":
                h = m[i](hs[-1], temb)
            elif op == "input_skip":
                input_pyramid = self.pyramid_downsample(input_pyramid)
                h = m[i](input_pyramid, h)
            elif op == "input_residual":
                input_pyramid = m[i](input_pyramid)
                input_pyramid = (input_pyramid + h) / _SQRT2 if self.skip_rescale else input_pyramid + h
                h = input_pyramid

        h = hs[-1]
        h = m[self._mid_plan[0]](h, temb)
        h = m[self._mid_plan[1]](h)
        h = m[self._mid_plan[2]](h, temb)

        pyramid = None
        for op, i in self._up_plan:
            if op == "res_cat":
                h = m[i](torch.cat([h, hs.pop()], dim=1), temb)
            elif op == "attn":
                h = m[i](h)
            elif op == "res":
                h = m[i](h, temb)
            elif op == "resample":
                h = m[i](h)
            elif op == "pyramid_first":
                pyramid = m[i + 1](self.act(m[i](h)))
            elif op == "pyramid_output_skip":
                pyramid = self.pyramid_upsample(pyramid) + m[i + 1](self.act(m[i](h)))
            elif op == "pyramid_residual":
                pyramid = m[i](pyramid)
                pyramid = (pyramid + h) / _SQRT2 if self.skip_rescale else pyramid + h
                h = pyramid

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = m[self._out_plan[1]](self.act(m[self._out_plan[0]](h)))

        if self.scale_by_sigma:
            used_sigmas = time_cond if self.embedding_type == "fourier" else self.sigmas[time_cond.long()]
            h = h / used_sigmas.reshape(-1, *([1] * (h.dim() - 1))).to(h.dtype)
        return h.to(in_dtype)


# ----------------------------------------------------------------------------------------------------------------
def _section(config: Any, name: str) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        sec = config.get(name)
    else:
        sec = getattr(config, name, None)
    if sec is None:
        raise ValueError(f"config: expected a score_sde config with a '{name}' section (config['{name}'])")
    if not isinstance(sec, Mapping):
        if hasattr(sec, "to_dict"):        # ml_collections.ConfigDict (score_sde's own configs)
            sec = sec.to_dict()
        elif hasattr(sec, "__dict__"):     # argparse.Namespace (DiffPure's dict2namespace of the yaml)
            sec = vars(sec)
        else:
            raise ValueError(f"config['{name}']: expected a dict, got {type(sec).__name__}")
    return sec


def ncsnpp_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map score_sde's config (``model`` and ``data`` sections) to :class:`NCSNpp` keyword arguments."""
    model = _section(config, "model")
    data = _section(config, "data")
    name = str(model.get("name", "ncsnpp")).lower()
    if name != "ncsnpp":
        raise ValueError(f"config['model']['name']: only 'ncsnpp' (NCSN++/DDPM++) is supported, got {name!r}")
    try:
        training = _section(config, "training")
    except ValueError:
        training = {}
    embedding_type = str(model.get("embedding_type", "fourier")).lower()
    if embedding_type == "fourier" and training.get("continuous", True) is False:
        raise ValueError("config['model']['embedding_type']: 'fourier' requires config['training']['continuous']")
    missing = [k for k in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions") if k not in model]
    missing += [f"data.{k}" for k in ("image_size",) if k not in data]
    if missing:
        raise ValueError(f"config: missing keys {missing}")
    defaults = NCSNPP_CIFAR10_CONFIG["model"]

    def get(key, default=None):
        return model.get(key, defaults.get(key, default))

    # ints and bools go to NCSNpp as they are (its checks name them; nothing is rounded or coerced here)
    return {
        "image_size": data["image_size"], "num_channels": data.get("num_channels", 3),
        "centered": check_bool("centered", data.get("centered", False)),
        "nf": model["nf"], "ch_mult": tuple(model["ch_mult"]), "num_res_blocks": model["num_res_blocks"],
        "attn_resolutions": tuple(model["attn_resolutions"]), "dropout": float(get("dropout")),
        "resamp_with_conv": bool(get("resamp_with_conv")), "conditional": bool(get("conditional")),
        "fir": bool(get("fir")), "fir_kernel": tuple(get("fir_kernel")), "skip_rescale": bool(get("skip_rescale")),
        "resblock_type": get("resblock_type"), "progressive": get("progressive"),
        "progressive_input": get("progressive_input"), "progressive_combine": get("progressive_combine"),
        "init_scale": float(get("init_scale")), "embedding_type": embedding_type,
        "fourier_scale": float(get("fourier_scale")), "nonlinearity": get("nonlinearity"),
        "scale_by_sigma": bool(get("scale_by_sigma")), "sigma_min": float(get("sigma_min")),
        "sigma_max": float(get("sigma_max")), "num_scales": get("num_scales"),
        "attention_type": get("attention_type"),
    }
