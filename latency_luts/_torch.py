"""PyTorch eager backend: CPU or CUDA, fp32/fp16/bf16, optionally channels_last."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ._base import Backend, torch_dtype
from .timing import Measurement, measure_stable

__all__ = ["TorchBackend"]


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchBackend(Backend):
    """PyTorch eager; CPU with a fixed thread count (restored after), or CUDA timed with events.

    Example:
        >>> import latency_luts, torch
        >>> t = latency_luts.Target("t", backend="torch", threads=1)
        >>> latency_luts.get_backend(t).measure(torch.nn.ReLU(), (8, 4, 4)).ms > 0
        True
    """

    name = "torch"
    package = "torch"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16", "bf16")

    def measure(self, module: nn.Module, in_shape: tuple[int, ...]) -> Measurement:
        self.check()
        t = self.target
        dtype = torch_dtype(t.precision)
        fmt = torch.channels_last if (t.channels_last and len(in_shape) == 3) else None
        if t.device != "cpu" or dtype != torch.float32 or fmt is not None:
            module = copy.deepcopy(module)  # never move or cast the caller's module
        module = module.eval().to(t.device, dtype)
        x = torch.randn(t.batch, *in_shape, device=t.device, dtype=dtype)
        if fmt is not None:
            module = module.to(memory_format=fmt)
            x = x.contiguous(memory_format=fmt)
        with torch.inference_mode(), _threads(t.num_threads()):
            if t.device == "cpu":
                return measure_stable(lambda: module(x), clock=t.clock)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)

            def run() -> float:
                start.record()
                module(x)
                end.record()
                end.synchronize()
                return start.elapsed_time(end)

            return measure_stable(run)

    def fingerprint(self) -> dict:
        info = {"torch": torch.__version__, "torch_threads": self.target.num_threads(),
                "channels_last": self.target.channels_last}
        if self.target.device == "cuda":
            info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        return info
