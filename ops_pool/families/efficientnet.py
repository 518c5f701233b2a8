"""``efn_{k}x{k}_e{e}_se{s}``: MobileNetV2 / EfficientNet inverted residual blocks.

``se1.00`` means no squeeze-excitation (HANT naming); otherwise the SE reduced width is
``round_channels(mid * s)``.
"""

from functools import partial

from torch import nn

from .._layers import SqueezeExcite, conv_bn, wrap_skip
from .._registry import register
from .._shapes import conv_stride, round_channels
from ._accepts import accepts_conv

__all__ = ["EFN_KERNELS", "EFN_EXPANSIONS", "EFN_SE_RATIOS", "efn_name", "build_efn"]

EFN_KERNELS = (3, 5)
EFN_EXPANSIONS = (1, 3, 6)
EFN_SE_RATIOS = ("1.00", "0.04", "0.025")


def efn_name(k: int, e: int, se: str) -> str:
    return f"efn_{k}x{k}_e{e}_se{se}"


def build_efn(in_shape, out_shape, *, k: int, e: int, se: str) -> nn.Module:
    c_in, c_out = in_shape[0], out_shape[0]
    stride = conv_stride(in_shape, out_shape)
    mid = c_in if e == 1 else round_channels(c_in * e)
    layers: list[nn.Module] = []
    if e != 1:
        layers += conv_bn(c_in, mid, 1, act=nn.SiLU)
    layers += conv_bn(mid, mid, k, stride=stride, groups=mid, act=nn.SiLU)
    if se != "1.00":
        layers.append(SqueezeExcite(mid, round_channels(mid * float(se))))
    layers += conv_bn(mid, c_out, 1)
    return wrap_skip(nn.Sequential(*layers), in_shape, out_shape)


for _k in EFN_KERNELS:
    for _e in EFN_EXPANSIONS:
        for _se in EFN_SE_RATIOS:
            register(efn_name(_k, _e, _se), accepts=accepts_conv)(
                partial(build_efn, k=_k, e=_e, se=_se)
            )
