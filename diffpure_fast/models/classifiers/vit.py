"""DeiT's Vision Transformer with the official key names (facebookresearch/deit ``models.py``, built on timm's
``VisionTransformer``: patch embedding by a strided convolution, a class token, learned position embeddings,
pre-norm blocks, the class token's final norm to ``head``).

``deit_small_patch16_224`` (DiffPure's ``imagenet-deit-s``): embed 384, depth 12, 6 heads of 64, MLP ratio 4,
``qkv_bias``, LayerNorm eps 1e-6, exact (erf) GELU, 224x224 inputs. Every DeiT has 64-dimensional heads (Ti: 192 / 3,
S: 384 / 6, B: 768 / 12), which is how ``architecture_from_state_dict`` reads the head count from the width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..._validate import OptionError, check_float, check_int
from ._infer import count_indexed, need

__all__ = ["VisionTransformer"]

DEIT_HEAD_DIM = 64


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3, heads, d / heads): q, k, v in that order, head-major within each (timm's layout)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        # softmax(q k^T / sqrt(d / heads)) v, fused (timm 1.0 uses the same call where torch has it)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # the exact (erf) GELU, timm's nn.GELU default


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, tokens in row-major order, D)


class VisionTransformer(nn.Module):
    """A class-token ViT: ``head(norm(blocks(cat(cls, patches) + pos_embed))[:, 0])``.

    img_size, patch_size: pixels (img_size a multiple of patch_size); embed_dim D; depth; num_heads (D divisible by
    it); mlp_hidden (4 D in DeiT); num_classes; qkv_bias; eps: LayerNorm's (1e-6 in DeiT).
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_hidden: int | None = None, num_classes: int = 1000, qkv_bias: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        img_size, patch_size = check_int("img_size", img_size), check_int("patch_size", patch_size)
        d, depth, heads = (check_int(k, v) for k, v in (("embed_dim", embed_dim), ("depth", depth),
                                                         ("num_heads", num_heads)))
        hidden = check_int("mlp_hidden", 4 * d if mlp_hidden is None else mlp_hidden)
        num_classes = check_int("num_classes", num_classes)
        eps = check_float("eps", eps, low=0.0, low_open=True)
        if img_size % patch_size:
            raise ValueError(f"img_size: expected a multiple of patch_size {patch_size}, got {img_size}")
        if d % heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim {d}, got {heads}")
        tokens = (img_size // patch_size) ** 2
        self.patch_embed = _PatchEmbed(patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, d))
        self.blocks = nn.Sequential(*[_Block(d, heads, hidden, bool(qkv_bias), eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, num_classes)
        self.input_size = (3, img_size, img_size)
        self.architecture = dict(img_size=img_size, patch_size=patch_size, embed_dim=d, depth=depth,
                                 num_heads=heads, mlp_hidden=hidden, num_classes=num_classes,
                                 qkv_bias=bool(qkv_bias), eps=eps)

    @staticmethod
    def architecture_from_state_dict(state, where: str = "") -> dict:
        """Every size from the keys and shapes; the head count as embed_dim / 64 (DeiT's head width)."""
        d = need(state, "cls_token", where).shape[-1]
        patch = need(state, "patch_embed.proj.weight", where).shape[-1]
        tokens = need(state, "pos_embed", where).shape[1] - 1
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise OptionError("checkpoint", f"pos_embed has {tokens} patch tokens, not a square grid (a ViT without "
                                            f"a class token, or with a distillation token, is not DeiT-S's layout)",
                              where=where)
        if d % DEIT_HEAD_DIM:
            raise OptionError("checkpoint", f"embed_dim {d} is not a multiple of DeiT's {DEIT_HEAD_DIM}-dimensional "
                                            f"heads; pass num_heads=", where=where)
        return dict(img_size=side * patch, patch_size=patch, embed_dim=d,
                    depth=count_indexed(state, "blocks.{}.norm1.weight", where), num_heads=d // DEIT_HEAD_DIM,
                    mlp_hidden=need(state, "blocks.0.mlp.fc1.weight", where).shape[0],
                    num_classes=need(state, "head.weight", where).shape[0], qkv_bias="blocks.0.attn.qkv.bias" in state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
