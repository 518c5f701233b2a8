"""Roofline estimate of an op's latency on hardware that is not on this machine.

Model: one forward of the op at batch 1 on this CPU is traced at the ATen level; every ATen op
that is not a view becomes a kernel with

- FLOPs from ``torch.utils.flop_counter``'s formulas (convolutions, matmuls; 0 otherwise),
- bytes = its weight inputs (parameters and buffers, once) + its activation inputs and outputs
  (x batch), at the target's precision,

and time ``max(FLOPs / (peak x compute_efficiency), bytes / (bandwidth x memory_efficiency))
+ launch_overhead``. FLOPs and activation bytes scale linearly with the batch. If the profile
fuses pointwise ops (``fuse_pointwise``: TensorRT), an elementwise op (output as large as its
largest input, no FLOP formula) after a kernel is folded into it at no cost. The op's estimate is
the sum over its kernels. Peaks and efficiencies come from the target profile (``targets.yaml``).

Example:
    >>> import torch, latency_luts
    >>> est = latency_luts.RooflineEstimator(latency_luts.get_target("v100"))
    >>> est.measure(torch.nn.Conv2d(64, 64, 3, padding=1), (64, 56, 56)).estimated
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ._base import Backend
from ._errors import BackendUnavailableError
from .timing import Measurement

__all__ = ["RooflineEstimator", "Kernel"]

_FREE = {"detach", "alias", "lift_fresh", "_to_copy", "empty", "zeros", "ones", "empty_like",
         "zeros_like", "ones_like", "randn", "copy_"}


@dataclass
class Kernel:
    """One ATen op of the traced forward, at batch 1."""

    op: str
    flops: float
    weight_elems: int
    act_elems: int
    pointwise: bool


class _Trace(TorchDispatchMode):
    def __init__(self, weight_ids: set[int]):
        super().__init__()
        self.weight_ids = weight_ids
        self.kernels: list[Kernel] = []

    def _is_weight(self, t: torch.Tensor) -> bool:
        return id(t) in self.weight_ids or (t._base is not None and id(t._base) in self.weight_ids)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _same_shape_output(func, args)
        if out is None:
            out = func(*args, **kwargs)
        packet = func._overloadpacket
        if getattr(func, "is_view", False) or packet.__name__ in _FREE:
            return out
        flops = 0.0
        if packet in flop_registry:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        ins = _tensors((*args, *kwargs.values()))
        outs = _tensors(out if isinstance(out, (tuple, list)) else (out,))
        w = sum(t.numel() for t in ins if self._is_weight(t))
        a = sum(t.numel() for t in ins if not self._is_weight(t)) + sum(t.numel() for t in outs)
        biggest_in = max((t.numel() for t in ins), default=0)
        pointwise = flops == 0 and bool(outs) and outs[0].numel() >= biggest_in
        self.kernels.append(Kernel(packet.__name__, flops, w, a, pointwise))
        return out


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among `values` and in their lists and tuples (an ATen op's arguments are
    flat but for tensor lists; faster than a pytree walk, which was most of a trace)."""
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found.extend(_tensors(v))
    return found


def _like(x: torch.Tensor) -> torch.Tensor:
    """``empty_like(x)``; for a contiguous `x` through ``new_empty``, which skips the Python
    stride computation of torch's meta ``empty_like``."""
    return x.new_empty(x.shape) if x.is_contiguous() else torch.empty_like(x)


_aten = torch.ops.aten
# ops whose output has their first input's shape: on meta tensors their outputs are made here,
# since torch's meta kernels for them (Python decompositions) cost milliseconds a call
_UNARY = {getattr(_aten, n).default for n in (
    "relu", "relu_", "hardtanh", "hardtanh_", "silu", "silu_", "gelu", "sigmoid", "sigmoid_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "tanh", "leaky_relu", "elu", "mish",
    "_softmax", "_safe_softmax") if hasattr(_aten, n)}


_BINARY = {_aten.add.Tensor, _aten.mul.Tensor, _aten.sub.Tensor, _aten.div.Tensor}


def _conv_shape(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> list[int]:
    out = [x.shape[0], w.shape[0]]
    for i, size in enumerate(x.shape[2:]):
        k = dilation[i] * (w.shape[2 + i] - 1) + 1
        out.append((size + 2 * padding[i] - k) // stride[i] + 1)
    return out


def _same_shape_output(func, args: tuple):
    """The output of `func` on meta tensors where its shape follows from its inputs' by a rule
    (unary activations, norms, softmax, same-dtype broadcasting arithmetic, matrix products,
    plain convolutions), else None (the caller runs `func`)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.device.type != "meta":
        return None
    if func in _UNARY:
        return _like(x)
    if func in _BINARY:
        y = args[1]
        if isinstance(y, torch.Tensor) and y.dtype == x.dtype and len(args) == 2 and (
                y.shape == x.shape or y.dim() <= x.dim()) and x.is_contiguous():
            shape = torch.broadcast_shapes(x.shape, y.shape)
            return _like(x) if shape == x.shape else x.new_empty(shape)
        return None
    if func is _aten.clone.default and not args[1:]:
        return x.new_empty(x.shape)  # contiguous, as clone of a dense tensor gives
    if func in (_aten.mm.default, _aten.bmm.default) and x.is_contiguous():
        return x.new_empty((*x.shape[:-1], args[1].shape[-1]))
    if func is _aten.addmm.default and len(args) == 3:  # (bias, x, w)
        return x.new_empty((args[1].shape[0], args[2].shape[1]))
    if func is _aten.convolution.default:
        _, w, _, stride, padding, dilation, transposed, _, _ = args
        if transposed or not x.is_contiguous():
            return None
        return x.new_empty(_conv_shape(x, w, stride, padding, dilation))
    if func is _aten._native_batch_norm_legit_no_training.default:
        return _like(x), x.new_empty(0), x.new_empty(0)
    if func is _aten.native_batch_norm.default:  # (out, save_mean, save_invstd)
        saved = x.shape[1] if args[5] else 0  # in eval mode nothing is saved (as on a CPU)
        return _like(x), x.new_empty(saved), x.new_empty(saved)
    if func is _aten.native_layer_norm.default:  # (out, mean, rstd) over the last k dims
        k = len(args[1])
        stat = (*x.shape[:x.dim() - k], *([1] * k))
        return x.new_empty(x.shape), x.new_empty(stat), x.new_empty(stat)  # contiguous
    return None


def _trace(module: nn.Module, x: torch.Tensor) -> list[Kernel]:
    ids = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    mode = _Trace(ids)
    with torch.no_grad(), mode:
        module(x)
    return mode.kernels


def trace_kernels(module: nn.Module, in_shape: tuple[int, ...]) -> list[Kernel]:
    """The ATen ops of one batch-1 fp32 forward of a copy of `module`: on the meta device (no
    compute), or on this CPU if the module does not run on meta tensors. A module that is on
    the meta device already (built there) is traced as it is, in eval mode."""
    tensors = list(module.parameters()) + list(module.buffers())
    if tensors and all(t.device.type == "meta" for t in tensors):
        return _trace(module.eval(), torch.empty(1, *in_shape, device="meta"))
    module = copy.deepcopy(module).eval().float()
    try:
        return _trace(module.to("meta"), torch.empty(1, *in_shape, device="meta"))
    except Exception:  # e.g. tensor constants that stay on the CPU
        module = copy.deepcopy(module).cpu()
        return _trace(module, torch.randn(1, *in_shape))


class RooflineEstimator(Backend):
    """Estimates latency on a target whose hardware is absent, from its peak figures.

    `measure` returns a `Measurement` with ``estimated=True``, ``runs=0``, ``spread_ms=0``.
    """

    name = "roofline"
    package = "torch"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16", "bf16")
    estimates = True
    shapes_only = True

    def check(self) -> None:
        if not self.target.can_estimate:
            raise BackendUnavailableError(
                f"target '{self.target.name}' has no peak figures (peak_tflops, "
                "mem_bandwidth_gbs) to estimate latency from, and its hardware is not here; "
                "measure it on the target machine with `hant lut build MODEL --target "
                f"{self.target.name} -o FILE`"
            )

    def kernel_ms(self, kernels: list[Kernel]) -> list[float]:
        """Estimated ms per kernel (0 for a pointwise op fused into the previous kernel)."""
        t = self.target
        flops_s = t.peak_tflops * 1e12 * t.compute_efficiency
        bytes_s = t.mem_bandwidth_gbs * 1e9 * t.memory_efficiency
        out: list[float] = []
        have_kernel = False
        for k in kernels:
            if t.fuse_pointwise and k.pointwise and have_kernel:
                out.append(0.0)
                continue
            have_kernel = True
            nbytes = (k.weight_elems + k.act_elems * t.batch) * t.bytes_per_element
            sec = max(k.flops * t.batch / flops_s, nbytes / bytes_s)
            out.append(sec * 1000.0 + t.launch_overhead_us / 1000.0)
        return out

    def measure(self, module: nn.Module, in_shape: tuple[int, ...]) -> Measurement:
        self.check()
        ms = sum(self.kernel_ms(trace_kernels(module, tuple(in_shape))))
        return Measurement(ms, 0.0, 0, stable=True, estimated=True)

    def fingerprint(self) -> dict:
        t = self.target
        return {"torch": torch.__version__, "estimator": "roofline", "hardware": t.hardware,
                "peak_tflops": t.peak_tflops, "mem_bandwidth_gbs": t.mem_bandwidth_gbs,
                "compute_efficiency": t.compute_efficiency,
                "memory_efficiency": t.memory_efficiency,
                "launch_overhead_us": t.launch_overhead_us, "fuse_pointwise": t.fuse_pointwise,
                "source": t.source, "estimated": True}
