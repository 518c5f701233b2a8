"""``repvgg_{k}x{k}_ex{w}``: two RepVGG blocks (HANT section 3.1, Ding et al. 2021).

Block 1 maps ``C_in -> mid`` (stride) and ends with ReLU, block 2 maps ``mid -> C_out`` with no
activation; ``mid = round_channels(C_out * w)``, kernels ``{1, 3, 5, 7}`` and widths as the
other dense blocks. Each block trains three branches, kxk conv + BN, 1x1 conv + BN and, when its
input and output shapes are equal, a BN on the identity (timm's ``RepVggBlock``). For latency
measurement, export and inference the op is re-parameterized into one kxk conv per block with
:func:`ops_pool.reparameterize` (equal outputs in eval mode).
"""


import torch
from timm.models.byobnet import LayerFn, RepVggBlock
from torch import nn

from .._layers import wrap_skip
from .._shapes import conv_stride, round_channels
from .conv_blocks import register_dense_family

__all__ = ["RepVgg", "build_repvgg"]


class RepVgg(nn.Sequential):
    """Two :class:`timm.models.byobnet.RepVggBlock` s; :meth:`reparameterize` fuses each."""

    def __init__(self, c_in: int, mid: int, c_out: int, k: int, stride: int):
        super().__init__(
            RepVggBlock(c_in, mid, k, stride=stride, layers=LayerFn(act=nn.ReLU)),
            RepVggBlock(mid, c_out, k, layers=LayerFn(act=nn.Identity)),
        )

    def reparameterize(self) -> None:
        """Fuse every block's branches into a single kxk conv with bias, in place.

        The result equals the multi-branch op in eval mode (BN running statistics are folded),
        so fuse after training; it cannot be trained back into branches. On the meta device
        (an op built for its shapes only, e.g. for a roofline estimate) the fused weights are
        made from shapes, without the arithmetic.
        """
        for block in self:
            w = block.conv_kxk.conv.weight if block.reparam_conv is None else None
            if w is not None and w.is_meta:
                block._get_kernel_bias = lambda w=w: (torch.empty_like(w), w.new_empty(w.shape[0]))
            block.reparameterize()

    def zero_init_last(self) -> None:
        """Zero every BN scale of the last block, so that the op's output starts at zero."""
        for m in self[-1].modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.zeros_(m.weight)


def build_repvgg(in_shape, out_shape, *, k: int, w: str) -> nn.Module:
    mid = round_channels(out_shape[0] * float(w))
    body = RepVgg(in_shape[0], mid, out_shape[0], k, stride=conv_stride(in_shape, out_shape))
    return wrap_skip(body, in_shape, out_shape)


register_dense_family("repvgg", build_repvgg)
