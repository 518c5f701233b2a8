"""``ops_pool``: registry of candidate operators that may replace a teacher layer (HANT).

An op name fully determines the module given the layer's per-sample shapes (no batch dim):
``(C, H, W)`` for conv layers, ``(T, D)`` for transformer token layers, and the channel divisor
(see :func:`set_channel_divisor`).

Example:
    >>> import ops_pool
    >>> op = ops_pool.build("cb_stack_3x3_ex0.5", (16, 8, 8), (24, 4, 4))
    >>> len(ops_pool.valid_ops((88, 17, 17), (88, 17, 17))) >= 190
    True
"""

from . import families
from ._errors import OpShapeError, OpsPoolError, UnknownOpError
from ._inherit import inherit
from ._layers import Residual, SqueezeExcite
from ._registry import (
    TEACHER,
    build,
    is_registered,
    list_ops,
    register,
    unregister,
    valid_ops,
)
from ._reparam import reparameterize
from ._shapes import (
    CHANNEL_DIVISOR,
    channel_divisor,
    conv_stride,
    get_channel_divisor,
    is_conv_shape,
    is_token_shape,
    round_channels,
    set_channel_divisor,
)
from .families.attention import MAX_ATTENTION_POSITIONS

__all__ = [
    "TEACHER",
    "CHANNEL_DIVISOR",
    "MAX_ATTENTION_POSITIONS",
    "OpShapeError",
    "OpsPoolError",
    "Residual",
    "SqueezeExcite",
    "UnknownOpError",
    "build",
    "channel_divisor",
    "conv_stride",
    "families",
    "inherit",
    "get_channel_divisor",
    "is_conv_shape",
    "is_registered",
    "is_token_shape",
    "list_ops",
    "register",
    "reparameterize",
    "round_channels",
    "set_channel_divisor",
    "unregister",
    "valid_ops",
]
