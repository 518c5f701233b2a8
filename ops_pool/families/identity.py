"""``identity``: the layer is removed (only when input and output shapes are equal)."""

from torch import nn

from .._registry import register

__all__ = ["build_identity"]


def _accepts_identity(in_shape, out_shape) -> bool:
    return tuple(in_shape) == tuple(out_shape)


@register("identity", accepts=_accepts_identity)
def build_identity(in_shape, out_shape) -> nn.Module:
    return nn.Identity()
