"""Where the phases run: the device, mixed precision and memory format of the recipe's
``runtime`` section, resolved once per run and used by distillation, fitness, candidate
evaluation, finetuning and evaluation alike."""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import _parallel
from .recipe import RuntimeCfg

__all__ = ["Runtime", "resolve_runtime"]

_logger = logging.getLogger(__name__)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    """A resolved ``runtime`` section: ``amp`` is the autocast dtype, or None for fp32."""

    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = False
    loader_workers: int = 0

    @classmethod
    def cpu(cls) -> Runtime:
        """The CPU in fp32, in this process (the default of every phase function)."""
        return cls(torch.device("cpu"))

    def autocast(self):
        """Autocast to `amp` on the device (a no-op context in fp32)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def module(self, m: nn.Module) -> nn.Module:
        """`m` ready to run here: a copy on the device (the original stays where it is, so the
        teacher on the CPU keeps serving latency measurement and publishing), in the recipe's
        memory format. On the CPU in the default format: `m` itself."""
        if self.device.type == "cpu" and not self.channels_last:
            return m
        m = copy.deepcopy(m).to(self.device)
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def amp_name(self) -> str | None:
        """``float16`` / ``bfloat16``, or None for fp32."""
        return str(self.amp).replace("torch.", "") if self.amp else None

    def to_dict(self) -> dict:
        return {"device": str(self.device), "amp": self.amp_name,
                "channels_last": self.channels_last, "loader_workers": self.loader_workers}


def resolve_runtime(cfg: RuntimeCfg) -> Runtime:
    """The device (``auto``: this rank's GPU when CUDA is available, else the CPU), the autocast
    dtype (``auto``: fp16 on CUDA, fp32 on the CPU) and the decoding processes."""
    from .data import loader_workers

    device = _parallel.resolve_device(cfg.device)
    amp = cfg.amp
    if amp in (True, "auto"):
        amp = "fp16" if device.type == "cuda" else None
        if cfg.amp is True and device.type != "cuda":
            _logger.warning("runtime.amp is for CUDA; running in fp32 on %s", device)
    elif amp is False:
        amp = None
    if amp is not None and device.type != "cuda":
        _logger.warning("runtime.amp %s is for CUDA; running in fp32 on %s", amp, device)
        amp = None
    return Runtime(device, _DTYPES[amp] if amp else None, bool(cfg.channels_last),
                   loader_workers(cfg.loader_workers, device))
