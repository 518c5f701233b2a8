"""Helpers on per-sample layer shapes (no batch dimension), and the channel divisor.

Conv layers have shapes ``(C, H, W)``; transformer token layers have ``(T, D)``.
"""

import contextlib
from collections.abc import Iterator

from timm.layers import make_divisible

__all__ = [
    "CHANNEL_DIVISOR",
    "channel_divisor",
    "conv_stride",
    "get_channel_divisor",
    "is_conv_shape",
    "is_token_shape",
    "round_channels",
    "set_channel_divisor",
]

CHANNEL_DIVISOR = 8
"""Default multiple that candidate-op channel widths are rounded to (hardware friendly)."""

_divisor = CHANNEL_DIVISOR


def get_channel_divisor() -> int:
    """The multiple that :func:`round_channels` currently rounds to (default 8)."""
    return _divisor


def set_channel_divisor(divisor: int) -> int:
    """Round the widths of ops built from now on to multiples of ``divisor``; returns the old one.

    The divisor is part of every op's definition: the same name builds different widths under
    different divisors, so set it once, before distilling, and keep it for the whole run.

    Example:
        >>> import ops_pool
        >>> old = ops_pool.set_channel_divisor(16)
        >>> ops_pool.round_channels(40)
        48
        >>> _ = ops_pool.set_channel_divisor(old)
    """
    global _divisor
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"The channel divisor must be a positive int, got {divisor!r}")
    old, _divisor = _divisor, divisor
    return old


@contextlib.contextmanager
def channel_divisor(divisor: int) -> Iterator[int]:
    """Context manager: ops built inside it round their widths to multiples of ``divisor``.

    Example:
        >>> import ops_pool
        >>> with ops_pool.channel_divisor(32):
        ...     ops_pool.round_channels(100)
        96
    """
    old = set_channel_divisor(divisor)
    try:
        yield divisor
    finally:
        set_channel_divisor(old)


def _is_shape(s, ndim: int) -> bool:
    return (
        isinstance(s, (tuple, list))
        and len(s) == ndim
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
    )


def is_conv_shape(s) -> bool:
    """True when ``s`` is a per-sample conv feature shape ``(C, H, W)``."""
    return _is_shape(s, 3)


def is_token_shape(s) -> bool:
    """True when ``s`` is a per-sample token shape ``(T, D)``."""
    return _is_shape(s, 2)


def conv_stride(in_shape, out_shape) -> int | None:
    """Spatial stride mapping ``in_shape`` to ``out_shape`` (both ``(C, H, W)``).

    Returns 1 when H and W are unchanged, 2 when each is ``ceil(in / 2)``, else None.
    """
    if not (is_conv_shape(in_shape) and is_conv_shape(out_shape)):
        return None
    (_, h_in, w_in), (_, h_out, w_out) = in_shape, out_shape
    if (h_out, w_out) == (h_in, w_in):
        return 1
    if (h_out, w_out) == (-(-h_in // 2), -(-w_in // 2)):
        return 2
    return None


def round_channels(c: float, divisor: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (never below ``divisor``).

    ``divisor`` defaults to the current channel divisor (see :func:`set_channel_divisor`), read
    when called, i.e. when an op is built.
    """
    return int(make_divisible(c, divisor or _divisor))
