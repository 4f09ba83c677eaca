"""guided-diffusion's ADM UNet, compatible with the official ``*_diffusion*.pt`` state dicts.

Written for this project from the published architecture of ``openai/guided-diffusion`` (``guided_diffusion/unet.py``,
``nn.py``, ``script_util.py``; DiffPure vendors them unchanged). Matches the official module names and nesting
(``input_blocks.<i>.<j>.in_layers.2.weight``, ``qkv`` / ``proj_out`` as 1-D convolutions, ...), the parameter order
and the forward numerics: ``[cos, sin]`` timestep embedding, ``GroupNorm(32, C)`` evaluated in float32, FiLM
conditioning ``norm(h) * (1 + scale) + shift`` with ``use_scale_shift_norm``, nearest / 2x2-average resampling inside
up/down residual blocks, attention heads split before (legacy order) or after (``use_new_attention_order``) q/k/v.

Differences that do not change results: attention goes through ``scaled_dot_product_attention`` (the official code
scales q and k by ``ch^-1/4`` each and runs two einsums; the results agree to float32 rounding); gradient
checkpointing (``use_checkpoint``) is accepted but not applied (use ``torch.utils.checkpoint`` around the engine
instead). The torso dtype starts as float32 even when ``use_fp16=True``: the official constructor sets
``self.dtype = float16`` and relies on the caller running ``convert_to_fp16()``, which is what
:meth:`UNetModel.convert_to_fp16` does here (it casts the convolutions of input/middle/output blocks, the official
``convert_module_to_f16`` semantics, and sets the torso dtype).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int

__all__ = ["ADM_IMAGENET256_UNCOND_CONFIG", "UNetModel", "adm_default_channel_mult", "create_adm_model"]

NUM_CLASSES = 1000

# DiffPure's configs/imagenet.yml model section over guided-diffusion's model_and_diffusion_defaults().
ADM_IMAGENET256_UNCOND_CONFIG: dict[str, Any] = {
    "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": 64, "attention_resolutions": "32,16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": True,
    "use_fp16": True, "use_new_attention_order": False, "learn_sigma": True, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "1000", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": True, "rescale_learned_sigmas": False,
}

# create_model's own defaults (script_util.create_model signature)
_CREATE_MODEL_DEFAULTS: dict[str, Any] = {
    "channel_mult": "", "learn_sigma": False, "class_cond": False, "use_checkpoint": False,
    "attention_resolutions": "16", "num_heads": 1, "num_head_channels": -1, "num_heads_upsample": -1,
    "use_scale_shift_norm": False, "dropout": 0.0, "resblock_updown": False, "use_fp16": False,
    "use_new_attention_order": False,
}
# keys of create_model_and_diffusion that only configure the diffusion process (ignored by the network)
_DIFFUSION_KEYS = {"diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
                   "rescale_timesteps", "rescale_learned_sigmas"}


def adm_default_channel_mult(image_size: int) -> tuple[float, ...]:
    """``channel_mult`` that guided-diffusion's ``create_model`` uses when given ``channel_mult=""``."""
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if int(image_size) not in table:
        raise ValueError(f"image_size: no default channel_mult for image_size={image_size} (guided-diffusion has "
                         f"defaults for {sorted(table)}); pass channel_mult explicitly, e.g. '1,2,2'")
    return table[int(image_size)]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """guided-diffusion's embedding: ``[cos, sin]`` of ``t * exp(-log(max_period) k / half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (as in the official fp16 torso)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample: out_channels must equal channels without a convolution")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        _zero(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[2](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (``qkv``/``proj_out`` are 1x1 Conv1d as officially)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = int(num_heads)
        else:
            if channels % num_head_channels:
                raise ValueError(f"num_head_channels: q,k,v channels {channels} are not divisible by "
                                 f"num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"num_heads: {channels} channels cannot be split into {self.num_heads} heads")
        self.use_new_attention_order = bool(use_new_attention_order)
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        spatial = x.shape[2:]
        x = x.reshape(b, c, -1)
        length = x.shape[-1]
        qkv = self.qkv(self.norm(x))                                   # (B, 3C, T)
        heads, ch = self.num_heads, c // self.num_heads
        if self.use_new_attention_order:
            qkv = qkv.reshape(b, 3, heads, ch, length).transpose(0, 1)  # split q/k/v, then heads
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            qkv = qkv.reshape(b, heads, 3 * ch, length)                # split heads, then q/k/v
            q, k, v = qkv[:, :, :ch], qkv[:, :, ch:2 * ch], qkv[:, :, 2 * ch:]
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = a.transpose(-1, -2).reshape(b, c, length)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The ADM UNet (``guided_diffusion.unet.UNetModel``, 2-D only): ``forward(x, timesteps, y=None)``.

    ``attention_resolutions`` are downsampling *rates* (``image_size // res`` of the script's resolutions), as in
    the official class; :func:`create_adm_model` takes the script's keyword arguments instead.
    """

    def __init__(self, *, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True,
                 num_classes: int | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        # the package's integer rule (NumPy integers accepted, floats refused, never rounded)
        self.image_size = check_int("image_size", image_size)
        self.in_channels = check_int("in_channels", in_channels)
        self.model_channels = model_channels = check_int("num_channels", model_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.num_res_blocks = check_int("num_res_blocks", num_res_blocks, low=0)
        self.attention_resolutions = tuple(check_int("attention_resolutions", a) for a in attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = bool(use_fp16)
        self.dtype = torch.float32  # torso dtype; convert_to_fp16() changes it
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        def check_groups(ch):
            if ch % 32:
                raise ValueError(f"num_channels, channel_mult: every channel count must be divisible by 32 "
                                 f"(GroupNorm(32, C)), got {ch}")
            return ch

        def resblock(ch, out=None, up=False, down=False):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out,
                            use_scale_shift_norm=use_scale_shift_norm, up=up, down=down)

        def attn(ch, heads):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch = input_ch = check_groups(int(channel_mult[0] * model_channels))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = check_groups(int(mult * model_channels))
                layers: list[nn.Module] = [resblock(ch, out)]
                ch = out
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    resblock(ch, ch, down=True) if resblock_updown
                    else Downsample(ch, conv_resample, out_channels=ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch), attn(ch, num_heads), resblock(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                out = int(model_channels * mult)
                layers = [resblock(ch + ich, out)]
                ch = out
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 _zero(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    # ---- precision of the torso (official convert_to_fp16 / convert_to_fp32) ----
    def _convert_torso(self, dtype: torch.dtype) -> None:
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for mod in part.modules():
                if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    mod.weight.data = mod.weight.data.to(dtype)
                    if mod.bias is not None:
                        mod.bias.data = mod.bias.data.to(dtype)
        self.dtype = dtype

    def convert_to_fp16(self, dtype: torch.dtype = torch.float16) -> None:
        """Cast the convolutions of input/middle/output blocks to ``dtype`` (float16 as officially; bfloat16 is
        accepted too); norms, linears, the time embedding and the output head stay float32."""
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float16 or torch.bfloat16, got {dtype}")
        self._convert_torso(dtype)

    def convert_to_fp32(self) -> None:
        self._convert_torso(torch.float32)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y: must be given if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        h = h.to(x.dtype)
        return self.out(h)


def _as_int_tuple(name: str, value) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            return tuple(int(p.strip()) for p in value.split(",") if p.strip())
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated integers, got {value!r}") from None
    parts = [value] if isinstance(value, (int, float, np.integer, np.floating)) else list(value)
    return tuple(check_int(name, p) for p in parts)   # never rounded


def create_adm_model(config: Mapping[str, Any] | None = None, **overrides) -> UNetModel:
    """Build the UNet from guided-diffusion's ``create_model_and_diffusion`` keyword arguments (``None``: DiffPure's
    ImageNet 256x256 unconditional model). Unknown keys raise ``ValueError``; diffusion-only keys are ignored."""
    cfg = dict(ADM_IMAGENET256_UNCOND_CONFIG if config is None else config)
    cfg.update(overrides)
    known = set(_CREATE_MODEL_DEFAULTS) | _DIFFUSION_KEYS | {"image_size", "num_channels", "num_res_blocks"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"config: unknown guided-diffusion keys {unknown}")
    missing = [k for k in ("image_size", "num_channels", "num_res_blocks") if k not in cfg]
    if missing:
        raise ValueError(f"config: missing keys {missing}")
    args = {**_CREATE_MODEL_DEFAULTS, **{k: v for k, v in cfg.items() if k not in _DIFFUSION_KEYS}}
    image_size = check_int("image_size", args["image_size"])
    if args["channel_mult"] in ("", None):
        channel_mult = adm_default_channel_mult(image_size)
    else:
        channel_mult = _as_int_tuple("channel_mult", args["channel_mult"])
    res = _as_int_tuple("attention_resolutions", args["attention_resolutions"])
    if any(r <= 0 for r in res):
        raise ValueError(f"attention_resolutions: expected positive resolutions, got {args['attention_resolutions']!r}")
    return UNetModel(
        image_size=image_size, in_channels=3, model_channels=args["num_channels"],
        out_channels=6 if args["learn_sigma"] else 3, num_res_blocks=args["num_res_blocks"],
        attention_resolutions=tuple(image_size // r for r in res), dropout=float(args["dropout"]),
        channel_mult=channel_mult, num_classes=NUM_CLASSES if args["class_cond"] else None,
        use_checkpoint=bool(args["use_checkpoint"]), use_fp16=bool(args["use_fp16"]),
        num_heads=check_int("num_heads", args["num_heads"], low=None),
        num_head_channels=check_int("num_head_channels", args["num_head_channels"], low=None),
        num_heads_upsample=check_int("num_heads_upsample", args["num_heads_upsample"], low=None),
        use_scale_shift_norm=bool(args["use_scale_shift_norm"]),
        resblock_updown=bool(args["resblock_updown"]), use_new_attention_order=bool(args["use_new_attention_order"]),
    )
