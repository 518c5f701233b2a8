"""Transformer ops for conv feature maps (HANT section 3.1), built from timm's layers.

- ``vit_d{d}_w{w}_h{h}``: a ViT encoder on the layer's positions as tokens (patch size 1):
  1x1 conv ``C_in -> w`` + learned position embedding, ``d`` timm ViT ``Block`` s (``h`` heads,
  MLP ratio 4), LayerNorm, 1x1 conv + BN to ``C_out``. Depth ``{1, 2}``, width
  ``{32, 64, ..., 1024}``, heads ``{4, 8, 16}``. On token layers ``(T, D)`` the same encoder
  works on the tokens with linear in/out projections and no position embedding.
- ``bot_e{e}``: BoTNet bottleneck: 1x1 conv + BN + ReLU to ``mid``, timm's ``BottleneckAttn``
  (4 heads, relative position logits), BN + ReLU, 1x1 conv + BN to ``C_out``.
- ``lambda_e{e}``: the same bottleneck with timm's ``LambdaLayer`` (4 heads, key depth 16, local
  position lambdas over a 9x9 context) instead of attention.

``mid = round_channels(C_out * e)`` (rounded up to a multiple of the 4 heads) for
``e in {1/4, 1/2, 1, 2, 3, 4}``. Stride-2 layers average-pool first (3x3 window, to
``ceil(H / 2)``) so that the op works at the output resolution. Attention cost grows with the
square of the number of positions, so these ops only accept layers whose output has at most
:data:`MAX_ATTENTION_POSITIONS` positions (tokens): high-resolution layers do not get them.
"""

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.lambda_layer import LambdaLayer
from timm.models.vision_transformer import Block
from torch import nn

from .._layers import conv_bn, downsample, wrap_skip
from .._registry import register
from .._shapes import conv_stride, is_token_shape, round_channels
from ._accepts import accepts_token

__all__ = [
    "MAX_ATTENTION_POSITIONS",
    "VIT_DEPTHS",
    "VIT_WIDTHS",
    "VIT_HEADS",
    "BOTTLENECK_EXPANSIONS",
    "ConvViT",
    "TokenViT",
    "accepts_attention",
    "build_vit",
    "build_bot",
    "build_lambda",
]

MAX_ATTENTION_POSITIONS = 1024
"""Largest number of output positions (``H_out * W_out``, or tokens ``T``) that ``vit_*``,
``bot_*`` and ``lambda_*`` accept: 32x32. EfficientNet-B2 at 256 px gets them from its 32x32
stage on, at 260 px from its 17x17 stage on."""

VIT_DEPTHS = (1, 2)
VIT_WIDTHS = (32, 64, 128, 256, 512, 1024)
VIT_HEADS = (4, 8, 16)
BOTTLENECK_EXPANSIONS = ("0.25", "0.5", "1.0", "2.0", "3.0", "4.0")
_BOT_HEADS = 4


def accepts_attention(in_shape, out_shape) -> bool:
    """Conv layers (stride 1 or 2) with at most ``MAX_ATTENTION_POSITIONS`` output positions."""
    return conv_stride(in_shape, out_shape) is not None and (
        out_shape[1] * out_shape[2] <= MAX_ATTENTION_POSITIONS
    )


def _accepts_vit(in_shape, out_shape) -> bool:
    if is_token_shape(in_shape):
        return accepts_token(in_shape, out_shape) and in_shape[0] <= MAX_ATTENTION_POSITIONS
    return accepts_attention(in_shape, out_shape)


def _blocks(depth: int, dim: int, heads: int) -> nn.Sequential:
    return nn.Sequential(
        *[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)]
    )


class ConvViT(nn.Module):
    """ViT encoder on a ``(C, H, W)`` feature map, one token per (output) position."""

    def __init__(self, in_shape, out_shape, depth: int, dim: int, heads: int):
        super().__init__()
        c_out, h, w = out_shape
        self.size = (h, w)
        self.pool = downsample(conv_stride(in_shape, out_shape))
        self.proj_in = nn.Conv2d(in_shape[0], dim, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, h * w, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = _blocks(depth, dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Sequential(*conv_bn(dim, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(self.pool(x))
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *self.size)
        return self.proj_out(x)


class TokenViT(nn.Module):
    """ViT encoder on ``(T, D)`` tokens with linear projections ``D_in -> w -> D_out``."""

    def __init__(self, d_in: int, d_out: int, depth: int, dim: int, heads: int):
        super().__init__()
        self.proj_in = nn.Linear(d_in, dim)
        self.blocks = _blocks(depth, dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.norm(self.blocks(self.proj_in(x))))


def build_vit(in_shape, out_shape, *, depth: int, dim: int, heads: int) -> nn.Module:
    if is_token_shape(in_shape):
        body = TokenViT(in_shape[1], out_shape[1], depth, dim, heads)
    else:
        body = ConvViT(in_shape, out_shape, depth, dim, heads)
    return wrap_skip(body, in_shape, out_shape)


def _bottleneck(in_shape, out_shape, e: str, make_mixer) -> nn.Module:
    c_in, c_out, h, w = in_shape[0], *out_shape
    mid = -(-round_channels(c_out * float(e)) // _BOT_HEADS) * _BOT_HEADS
    body = nn.Sequential(
        downsample(conv_stride(in_shape, out_shape)),
        *conv_bn(c_in, mid, 1, act=nn.ReLU),
        make_mixer(mid, (h, w)),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        *conv_bn(mid, c_out, 1),
    )
    return wrap_skip(body, in_shape, out_shape)


def _bottleneck_attn(mid: int, feat_size) -> nn.Module:
    return BottleneckAttn(mid, mid, feat_size=feat_size, num_heads=_BOT_HEADS)


def _lambda_layer(mid: int, feat_size) -> nn.Module:
    return LambdaLayer(mid, mid, num_heads=_BOT_HEADS, dim_head=16, r=9)


def build_bot(in_shape, out_shape, *, e: str) -> nn.Module:
    return _bottleneck(in_shape, out_shape, e, _bottleneck_attn)


def build_lambda(in_shape, out_shape, *, e: str) -> nn.Module:
    return _bottleneck(in_shape, out_shape, e, _lambda_layer)


for _d in VIT_DEPTHS:
    for _w in VIT_WIDTHS:
        for _h in VIT_HEADS:
            register(f"vit_d{_d}_w{_w}_h{_h}", accepts=_accepts_vit)(
                partial(build_vit, depth=_d, dim=_w, heads=_h)
            )

for _e in BOTTLENECK_EXPANSIONS:
    register(f"bot_e{_e}", accepts=accepts_attention)(partial(build_bot, e=_e))
for _e in BOTTLENECK_EXPANSIONS:
    register(f"lambda_e{_e}", accepts=accepts_attention)(partial(build_lambda, e=_e))
