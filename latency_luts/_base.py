"""The backend interface and the ONNX export shared by the ONNX-based backends."""

from __future__ import annotations

import functools
import importlib
import io
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ._errors import BackendUnavailableError
from .hardware import gpu_name
from .target import Target
from .timing import Measurement

__all__ = ["Backend", "onnx_bytes", "torch_dtype"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (``fp32``, ``fp16``, ``bf16``)."""
    return _DTYPES[precision]


class Backend:
    """Measures one module at one input shape on one target.

    Subclasses set ``name``, ``package`` (what to ``pip install``), ``devices`` and
    ``precisions``, and implement `measure`. Like PuLP's solvers, `available` says whether
    the package imports here; `check` raises a `BackendUnavailableError` saying what is missing.
    """

    name = "base"
    package = ""
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    estimates = False
    #: how a call is timed, recorded in a LUT's fingerprint; a work-dir LUT timed otherwise is
    #: measured again (``""``: as first built)
    timing = ""
    #: `measure` needs only the module's structure and shapes: it may be given a module built
    #: on the meta device (no weights), which costs far less to build
    shapes_only = False

    def __init__(self, target: Target):
        self.target = target

    @classmethod
    def available(cls) -> bool:
        """True if the backend's package (``package``) imports on this machine."""
        try:
            importlib.import_module(cls.package)
        except ImportError:
            return False
        return True

    def check(self) -> None:
        """Raise `BackendUnavailableError` if this backend cannot measure its target here."""
        t = self.target
        if t.device not in self.devices:
            raise BackendUnavailableError(
                f"backend '{self.name}' runs on {'/'.join(self.devices)}, target '{t.name}' "
                f"asks for device {t.device}"
            )
        if t.precision not in self.precisions:
            raise BackendUnavailableError(
                f"backend '{self.name}' on {t.device} measures {'/'.join(self.precisions)}, "
                f"target '{t.name}' asks for {t.precision}"
            )
        if t.device == "cuda" and gpu_name() is None:
            raise BackendUnavailableError(f"backend '{self.name}' needs a CUDA GPU; none found")
        if not self.available():
            raise BackendUnavailableError(
                f"backend '{self.name}' for target '{t.name}' is not installed: "
                f"pip install {self.package}"
            )

    def measure(self, module: nn.Module, in_shape: tuple[int, ...]) -> Measurement:
        """Latency of one call of `module` on a (batch, *in_shape) input."""
        raise NotImplementedError

    def timer(self, module: nn.Module, in_shape: tuple[int, ...]) -> Callable[[], Measurement]:
        """A function that measures `module` again each time it is called, with what it needs
        (an inference session, buffers) made once: for alternating measurements of two
        networks (`latency_luts.measure_paired`). Backends that have nothing to keep build
        everything again on each call."""
        return functools.partial(self.measure, module, in_shape)

    def overhead_ms(self) -> float:
        """Fixed cost of one call that every measurement includes (0 if negligible)."""
        return 0.0

    def fingerprint(self) -> dict:
        """Library versions that the measurements depend on."""
        return {"torch": torch.__version__}


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """`module` as ONNX bytes: the TorchScript exporter (fast for small graphs), else the
    dynamo exporter for modules the TorchScript one cannot take (e.g. timm's attention, whose
    fused ``scaled_dot_product_attention`` call it fails to script on recent torch).

    Example:
        >>> import torch
        >>> len(onnx_bytes(torch.nn.ReLU(), torch.randn(1, 3))) > 0
        True
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (example,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                opset_version=17,
            )
            return buf.getvalue()
        except Exception as first:  # noqa: BLE001 - retried with the other exporter below
            script_error = first
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False,
                                        input_names=["x"], output_names=["y"], opset_version=18)
        except Exception as second:
            raise RuntimeError(
                f"cannot export {type(module).__name__} to ONNX: TorchScript exporter: "
                f"{script_error}; dynamo exporter: {second}") from second
    return program.model_proto.SerializeToString()
