"""Params, GMACs and activations of a model at one input size (the figures timm's model cards
and ``benchmark.py`` report), counted with ``torch.utils.flop_counter``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["complexity"]


class _ActivationCounter(TorchDispatchMode):
    """Output elements of the ops `FlopCounterMode` counts (conv, matmul, attention): fvcore's
    activation count, which timm's benchmark reports."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            first = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
            self.count += first.numel() if first is not None else 0
        return out


@torch.no_grad()
def complexity(model: nn.Module, input_size: Sequence[int]) -> dict:
    """{'params_m', 'gmacs', 'activations_m'} of `model` (its current form, eval mode) on one
    image of `input_size` (C, H, W).

    Example:
        >>> complexity(nn.Conv2d(3, 64, 3, bias=False), (3, 224, 224))  # 64 x 222 x 222 x 27
        {'params_m': 0.001728, 'gmacs': 0.085163, 'activations_m': 3.154176}
    """
    was = model.training
    model.eval()
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=p.device if p is not None else "cpu")
    flops, acts = FlopCounterMode(display=False), _ActivationCounter()
    try:
        with flops, acts:
            model(x)
    finally:
        model.train(was)
    return {
        "params_m": round(sum(t.numel() for t in model.parameters()) / 1e6, 6),
        "gmacs": round(flops.get_total_flops() / 2 / 1e9, 6),
        "activations_m": round(acts.count / 1e6, 6),
    }
