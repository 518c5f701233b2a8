"""Small building blocks shared by the op families."""

import torch
from torch import nn

__all__ = ["Residual", "SqueezeExcite", "conv_bn", "downsample", "wrap_skip"]


class Residual(nn.Module):
    """``x + body(x)``: the skip connection added when input and output shapes match."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        _zero_last(body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _zero_last(body: nn.Module) -> None:
    """Start a residual op as the identity: zero the scale of its last norm (or its last linear
    layer). Distillation then begins from ``x`` rather than ``x + noise``, which matters when a
    calibration set allows only a few hundred steps (as in ResNet's zero-init of the last BN).

    When the last such layer sits in a module with a ``zero_init_last()`` method (timm's
    convention, e.g. a multi-branch block whose output sums several norms), that method is
    called instead."""
    last = _last_zeroable(body)
    if callable(getattr(last, "zero_init_last", None)):
        last.zero_init_last()
    elif last is not None and getattr(last, "weight", None) is not None:
        nn.init.zeros_(last.weight)
        if isinstance(last, nn.Linear) and last.bias is not None:
            nn.init.zeros_(last.bias)


def _last_zeroable(module: nn.Module) -> nn.Module | None:
    if callable(getattr(module, "zero_init_last", None)):
        return module
    if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.Linear)):
        return module
    last = None
    for child in module.children():
        found = _last_zeroable(child)
        if found is not None:
            last = found
    return last


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate with an explicit reduced width ``rd_channels``."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.SiLU()
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        return x * self.gate(s)


def conv_bn(
    c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None
) -> list[nn.Module]:
    """``Conv2d(k, stride, 'same'-style padding, no bias) + BN [+ act]`` as a list of layers."""
    layers = [
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act())
    return layers


def downsample(stride: int) -> nn.Module:
    """Average pooling to ``ceil(H / stride)`` (3x3 window, zero padding not counted) or identity.

    Used by the attention ops to work at the layer's output resolution."""
    if stride == 1:
        return nn.Identity()
    return nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)


def wrap_skip(body: nn.Module, in_shape, out_shape) -> nn.Module:
    """Add a skip connection around ``body`` when the layer's shapes match."""
    return Residual(body) if tuple(in_shape) == tuple(out_shape) else body
