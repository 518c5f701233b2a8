"""Inverted residual blocks (HANT section 3.1): ``efn`` (MBConv) and ``efnv2`` (fused MBConv).

- ``efn_{k}x{k}_e{e}_se{s}``: 1x1 expand to ``mid = round_channels(C_in * e)`` + BN + SiLU,
  depthwise kxk (stride) + BN + SiLU, [SE], 1x1 project + BN. For ``e1`` there is no expand
  conv and the depthwise conv works on ``C_in`` channels (MobileNetV2 / EfficientNet).
- ``efnv2_{k}x{k}_e{e}_se{s}``: full kxk expand conv (stride) to ``mid`` + BN + SiLU, [SE],
  1x1 project + BN (EfficientNetV2's fused MBConv). For ``e1`` it is a single kxk conv
  (stride) ``C_in -> C_out`` + BN [+ SE].

- ``efnlite_{k}x{k}_e{e}``: the MBConv above with ReLU6 in place of SiLU and no SE, as in
  EfficientNet-Lite and MobileNetV2. A Lite teacher's block is one of these, so an op of this
  family that keeps the block's structure inherits its exact function (see ``ops_pool.inherit``),
  which a SiLU op cannot; expansions ``{1, 2, 3, 4, 6}`` give finer steps below a Lite block's
  ``e6``.

``se1.00`` means no squeeze-excitation (HANT naming); otherwise the SE reduced width is
``round_channels(mid * s)`` (``C_out`` for ``efnv2 e1``). The paper's text lists
``se in {No, 0.04, 0.025}``; its selected architectures (figures 6 and 7) also use ``se0.25``,
so that ratio is in the pool too. Kernels ``{1, 3, 5}``, expansions ``{1, 3, 6}``.
"""

from functools import partial

from torch import nn

from .._layers import SqueezeExcite, conv_bn, wrap_skip
from .._registry import register
from .._shapes import conv_stride, round_channels
from ._accepts import accepts_conv

__all__ = [
    "EFN_KERNELS",
    "EFN_EXPANSIONS",
    "EFN_SE_RATIOS",
    "EFNLITE_EXPANSIONS",
    "efn_name",
    "build_efn",
    "build_efnv2",
]

EFN_KERNELS = (1, 3, 5)
EFN_EXPANSIONS = (1, 3, 6)
EFN_SE_RATIOS = ("1.00", "0.04", "0.025", "0.25")
EFNLITE_EXPANSIONS = (1, 2, 3, 4, 6)


def efn_name(k: int, e: int, se: str, family: str = "efn") -> str:
    """``efn_3x3_e6_se0.04``-style name of an inverted residual op."""
    return f"{family}_{k}x{k}_e{e}_se{se}"


def _se(channels: int, se: str) -> list[nn.Module]:
    return [] if se == "1.00" else [SqueezeExcite(channels, round_channels(channels * float(se)))]


def build_efn(in_shape, out_shape, *, k: int, e: int, se: str,
              act: type[nn.Module] = nn.SiLU) -> nn.Module:
    """MBConv: [1x1 expand], depthwise kxk, [SE], 1x1 project; ``act`` after the first two."""
    c_in, c_out = in_shape[0], out_shape[0]
    stride = conv_stride(in_shape, out_shape)
    mid = c_in if e == 1 else round_channels(c_in * e)
    layers: list[nn.Module] = []
    if e != 1:
        layers += conv_bn(c_in, mid, 1, act=act)
    layers += conv_bn(mid, mid, k, stride=stride, groups=mid, act=act)
    layers += _se(mid, se)
    layers += conv_bn(mid, c_out, 1)
    return wrap_skip(nn.Sequential(*layers), in_shape, out_shape)


def build_efnv2(in_shape, out_shape, *, k: int, e: int, se: str) -> nn.Module:
    """Fused MBConv: full kxk expand, [SE], 1x1 project; ``e1``: one kxk conv + BN [+ SE]."""
    c_in, c_out = in_shape[0], out_shape[0]
    stride = conv_stride(in_shape, out_shape)
    if e == 1:
        layers = conv_bn(c_in, c_out, k, stride=stride) + _se(c_out, se)
    else:
        mid = round_channels(c_in * e)
        layers = conv_bn(c_in, mid, k, stride=stride, act=nn.SiLU) + _se(mid, se)
        layers += conv_bn(mid, c_out, 1)
    return wrap_skip(nn.Sequential(*layers), in_shape, out_shape)


for _family, _build in (("efn", build_efn), ("efnv2", build_efnv2)):
    for _k in EFN_KERNELS:
        for _e in EFN_EXPANSIONS:
            for _se_ratio in EFN_SE_RATIOS:
                register(efn_name(_k, _e, _se_ratio, _family), accepts=accepts_conv)(
                    partial(_build, k=_k, e=_e, se=_se_ratio)
                )

for _k in EFN_KERNELS:
    for _e in EFNLITE_EXPANSIONS:
        register(f"efnlite_{_k}x{_k}_e{_e}", accepts=accepts_conv)(
            partial(build_efn, k=_k, e=_e, se="1.00", act=nn.ReLU6)
        )
