"""``ops_pool``: registry of candidate operators that may replace a teacher layer (HANT).

An op name fully determines the module given the layer's per-sample shapes (no batch dim):
``(C, H, W)`` for conv layers, ``(T, D)`` for transformer token layers.
"""

from . import families
from ._errors import OpShapeError, OpsPoolError, UnknownOpError
from ._layers import Residual, SqueezeExcite
from ._registry import build, is_registered, list_ops, register, unregister, valid_ops
from ._shapes import CHANNEL_DIVISOR, conv_stride, is_conv_shape, is_token_shape, round_channels

__all__ = [
    "CHANNEL_DIVISOR",
    "OpShapeError",
    "OpsPoolError",
    "Residual",
    "SqueezeExcite",
    "UnknownOpError",
    "build",
    "conv_stride",
    "families",
    "is_conv_shape",
    "is_registered",
    "is_token_shape",
    "list_ops",
    "register",
    "round_channels",
    "unregister",
    "valid_ops",
]
