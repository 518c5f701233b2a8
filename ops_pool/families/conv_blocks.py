"""Plain conv-BN-ReLU blocks.

- ``cb_stack_{k}x{k}_ex{w}`` ("CBRCB"): conv kxk (stride) + BN + ReLU + conv kxk + BN,
  with ``mid = round_channels(out_C * w)``.
- ``cb_bottle_{k}x{k}_ex{w}`` ("CBR-CBR-CB"): 1x1 + BN + ReLU, kxk (stride) + BN + ReLU,
  1x1 + BN, with ``mid = round_channels(out_C * w)``.
"""

from functools import partial

from torch import nn

from .._layers import conv_bn, wrap_skip
from .._registry import register
from .._shapes import conv_stride, round_channels
from ._accepts import accepts_conv

__all__ = [
    "CB_STACK_KERNELS",
    "CB_STACK_WIDTHS",
    "CB_BOTTLE_KERNELS",
    "CB_BOTTLE_WIDTHS",
    "build_cb_stack",
    "build_cb_bottle",
]

CB_STACK_KERNELS = (1, 3, 5)
CB_STACK_WIDTHS = ("0.25", "0.5", "1.0")
CB_BOTTLE_KERNELS = (3, 5)
CB_BOTTLE_WIDTHS = ("0.125", "0.25", "0.5")


def build_cb_stack(in_shape, out_shape, *, k: int, w: str) -> nn.Module:
    c_in, c_out = in_shape[0], out_shape[0]
    mid = round_channels(c_out * float(w))
    body = nn.Sequential(
        *conv_bn(c_in, mid, k, stride=conv_stride(in_shape, out_shape), act=nn.ReLU),
        *conv_bn(mid, c_out, k),
    )
    return wrap_skip(body, in_shape, out_shape)


def build_cb_bottle(in_shape, out_shape, *, k: int, w: str) -> nn.Module:
    c_in, c_out = in_shape[0], out_shape[0]
    mid = round_channels(c_out * float(w))
    body = nn.Sequential(
        *conv_bn(c_in, mid, 1, act=nn.ReLU),
        *conv_bn(mid, mid, k, stride=conv_stride(in_shape, out_shape), act=nn.ReLU),
        *conv_bn(mid, c_out, 1),
    )
    return wrap_skip(body, in_shape, out_shape)


for _k in CB_STACK_KERNELS:
    for _w in CB_STACK_WIDTHS:
        register(f"cb_stack_{_k}x{_k}_ex{_w}", accepts=accepts_conv)(
            partial(build_cb_stack, k=_k, w=_w)
        )

for _k in CB_BOTTLE_KERNELS:
    for _w in CB_BOTTLE_WIDTHS:
        register(f"cb_bottle_{_k}x{_k}_ex{_w}", accepts=accepts_conv)(
            partial(build_cb_bottle, k=_k, w=_w)
        )
