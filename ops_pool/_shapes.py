"""Helpers on per-sample layer shapes (no batch dimension).

Conv layers have shapes ``(C, H, W)``; transformer token layers have ``(T, D)``.
"""

from timm.layers import make_divisible

__all__ = ["CHANNEL_DIVISOR", "is_conv_shape", "is_token_shape", "conv_stride", "round_channels"]

CHANNEL_DIVISOR = 8
"""Default multiple that candidate-op channel widths are rounded to (hardware friendly)."""


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


def round_channels(c: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Round a channel count to a multiple of ``divisor`` (never below ``divisor``)."""
    return int(make_divisible(c, divisor))
