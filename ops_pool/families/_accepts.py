"""Shape predicates shared by the op families."""

from .._shapes import conv_stride, is_token_shape

__all__ = ["accepts_conv", "accepts_token"]


def accepts_conv(in_shape, out_shape) -> bool:
    """Conv shapes ``(C, H, W)`` related by stride 1 or 2."""
    return conv_stride(in_shape, out_shape) is not None


def accepts_token(in_shape, out_shape) -> bool:
    """Token shapes ``(T, D)`` with the same number of tokens in and out."""
    return is_token_shape(in_shape) and is_token_shape(out_shape) and in_shape[0] == out_shape[0]
