"""Building ops on the meta device for shape and cost analysis, without initialising them.

On the meta device a tensor has a shape and no values, so initialising a parameter does nothing
but costs Python time: for the roofline estimate (``latency_luts.roofline``), which builds
thousands of ops only to trace them, torch's own layers' ``reset_parameters`` was about half of
each build. Inside :func:`on_meta` those of the layers below are skipped for modules whose
parameters are on the meta device; a module built on any other device (in another thread, say)
is initialised as usual.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["on_meta"]

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
           nn.GroupNorm, nn.Embedding)
_lock = threading.Lock()
_depth = 0
_saved: dict[type, object] = {}


def _skipping(original):
    def reset_parameters(self: nn.Module) -> None:
        params = list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))
        if not params or any(not p.is_meta for p in params):
            original(self)

    return reset_parameters


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules created inside are on the meta device, torch's conv, linear, norm and embedding
    layers uninitialised (see the module docstring)."""
    global _depth
    with _lock:
        if _depth == 0:
            for cls in _LAYERS:
                _saved[cls] = cls.__dict__["reset_parameters"]
                cls.reset_parameters = _skipping(_saved[cls])
        _depth += 1
    try:
        with torch.device("meta"):
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for cls, original in _saved.items():
                    cls.reset_parameters = original
                _saved.clear()
