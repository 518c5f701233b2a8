"""Dense conv-BN(-ReLU) blocks (HANT section 3.1), each for kernels ``{1, 3, 5, 7}`` and widths
``w in {1/16, 1/10, 1/8, 1/5, 1/4, 1/2, 1, 2, 3, 4}`` (named ``ex0.0625`` ... ``ex4.0``), with
``mid = round_channels(C_out * w)``; the stride, when the layer has one, is in the first kxk conv.

- ``cb_stack_{k}x{k}_ex{w}`` ("CBRCB"): kxk conv + BN + ReLU, kxk conv + BN.
- ``cb_bottle_{k}x{k}_ex{w}`` ("CBR-CBR-CB"): 1x1 + BN + ReLU, kxk + BN + ReLU, 1x1 + BN.
- ``cb_res_{k}x{k}_ex{w}`` ("CB pair", ResNet-style): kxk conv + BN + ReLU, 1x1 conv + BN, plus
  a shortcut even when the shapes differ (then a 1x1 conv + BN projection with the stride).
- ``conv_cs_{k}x{k}_ex{w}`` ("CBR pairs", cross-stage partial as in CSPNet): kxk conv + BN +
  ReLU to ``mid``; half of its channels go through a second kxk conv + BN + ReLU, the other half
  bypass it; both halves are concatenated and projected by a 1x1 conv + BN.

The paper does not spell out ``cb_res`` and ``conv_cs`` beyond the words quoted; the structures
above are our reading. ``repvgg`` (same kernels and widths) is in :mod:`.repvgg`.
"""

from functools import partial

import torch
from torch import nn

from .._layers import _zero_last, conv_bn, wrap_skip
from .._registry import register
from .._shapes import conv_stride, round_channels
from ._accepts import accepts_conv

__all__ = [
    "DENSE_KERNELS",
    "DENSE_WIDTHS",
    "CrossStagePartial",
    "ResidualPair",
    "build_cb_stack",
    "build_cb_bottle",
    "build_cb_res",
    "build_conv_cs",
    "register_dense_family",
]

DENSE_KERNELS = (1, 3, 5, 7)
DENSE_WIDTHS = ("0.0625", "0.1", "0.125", "0.2", "0.25", "0.5", "1.0", "2.0", "3.0", "4.0")


def _mid(out_shape, w: str) -> int:
    return round_channels(out_shape[0] * float(w))


def build_cb_stack(in_shape, out_shape, *, k: int, w: str) -> nn.Module:
    c_in, c_out, mid = in_shape[0], out_shape[0], _mid(out_shape, w)
    body = nn.Sequential(
        *conv_bn(c_in, mid, k, stride=conv_stride(in_shape, out_shape), act=nn.ReLU),
        *conv_bn(mid, c_out, k),
    )
    return wrap_skip(body, in_shape, out_shape)


def build_cb_bottle(in_shape, out_shape, *, k: int, w: str) -> nn.Module:
    c_in, c_out, mid = in_shape[0], out_shape[0], _mid(out_shape, w)
    body = nn.Sequential(
        *conv_bn(c_in, mid, 1, act=nn.ReLU),
        *conv_bn(mid, mid, k, stride=conv_stride(in_shape, out_shape), act=nn.ReLU),
        *conv_bn(mid, c_out, 1),
    )
    return wrap_skip(body, in_shape, out_shape)


class ResidualPair(nn.Module):
    """``body(x) + shortcut(x)`` with a 1x1 conv-BN projection shortcut (shapes differ)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        _zero_last(body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def build_cb_res(in_shape, out_shape, *, k: int, w: str) -> nn.Module:
    c_in, c_out, mid = in_shape[0], out_shape[0], _mid(out_shape, w)
    stride = conv_stride(in_shape, out_shape)
    body = nn.Sequential(
        *conv_bn(c_in, mid, k, stride=stride, act=nn.ReLU),
        *conv_bn(mid, c_out, 1),
    )
    if tuple(in_shape) == tuple(out_shape):
        return wrap_skip(body, in_shape, out_shape)
    return ResidualPair(body, nn.Sequential(*conv_bn(c_in, c_out, 1, stride=stride)))


class CrossStagePartial(nn.Module):
    """kxk CBR to ``2 * half`` channels; one half through a second kxk CBR; concat; 1x1 CB."""

    def __init__(self, c_in: int, c_out: int, half: int, k: int, stride: int):
        super().__init__()
        self.half = half
        self.conv1 = nn.Sequential(*conv_bn(c_in, 2 * half, k, stride=stride, act=nn.ReLU))
        self.conv2 = nn.Sequential(*conv_bn(half, half, k, act=nn.ReLU))
        self.transition = nn.Sequential(*conv_bn(2 * half, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        bypass, part = torch.split(x, [self.half, self.half], dim=1)
        return self.transition(torch.cat([bypass, self.conv2(part)], dim=1))


def build_conv_cs(in_shape, out_shape, *, k: int, w: str) -> nn.Module:
    half = round_channels(out_shape[0] * float(w) / 2)
    body = CrossStagePartial(
        in_shape[0], out_shape[0], half, k, stride=conv_stride(in_shape, out_shape)
    )
    return wrap_skip(body, in_shape, out_shape)


def register_dense_family(family: str, builder) -> None:
    """Register ``{family}_{k}x{k}_ex{w}`` for every dense kernel and width."""
    for k in DENSE_KERNELS:
        for w in DENSE_WIDTHS:
            register(f"{family}_{k}x{k}_ex{w}", accepts=accepts_conv)(partial(builder, k=k, w=w))


for _family, _builder in (
    ("cb_stack", build_cb_stack),
    ("cb_bottle", build_cb_bottle),
    ("cb_res", build_cb_res),
    ("conv_cs", build_conv_cs),
):
    register_dense_family(_family, _builder)
