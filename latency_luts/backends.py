"""Measuring backends in a registry, and `get_backend`, which picks one for a target.

Example:
    >>> import latency_luts
    >>> type(latency_luts.get_backend("cpu")).__name__
    'OnnxRuntimeBackend'
    >>> type(latency_luts.get_backend("v100", allow_estimate=True)).__name__  # no V100 here
    'RooflineEstimator'
"""

from __future__ import annotations

import logging

from ._base import Backend, onnx_bytes
from ._errors import BackendUnavailableError
from ._onnxruntime import OnnxRuntimeBackend
from ._tensorrt import TensorRTBackend
from ._torch import TorchBackend
from .hardware import device_name, hardware_present
from .roofline import RooflineEstimator
from .target import Target, get_target
from .timing import Measurement

__all__ = ["Measurement", "Backend", "OnnxRuntimeBackend", "TorchBackend", "TensorRTBackend",
           "RooflineEstimator", "get_backend", "list_backends", "onnx_bytes", "timing_method"]

_logger = logging.getLogger(__name__)

_BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "torch": TorchBackend,
    "tensorrt": TensorRTBackend,
    "roofline": RooflineEstimator,
}


def list_backends() -> dict[str, bool]:
    """Backend names and whether each one's package imports here."""
    return {name: cls.available() for name, cls in sorted(_BACKENDS.items())}


def timing_method(target: str | Target) -> str:
    """How `target`'s backend times a call (`Backend.timing`; ``""`` for an unknown backend):
    a measured LUT whose fingerprint records another method is out of date."""
    cls = _BACKENDS.get(get_target(target).backend)
    return cls.timing if cls is not None else ""


def get_backend(target: str | Target, allow_estimate: bool = False) -> Backend:
    """The backend that measures `target` on this machine.

    Args:
        target: a profile name or a `Target`.
        allow_estimate: if the target's hardware is not here (see `hardware_present`), return a
            `RooflineEstimator` instead of raising.

    Raises:
        BackendUnavailableError: unknown backend, hardware not here (and no estimate allowed),
            package not installed (the message names it), or no CUDA GPU for a GPU backend.
    """
    target = get_target(target)
    cls = _BACKENDS.get(target.backend)
    if cls is None:
        raise BackendUnavailableError(
            f"target '{target.name}' asks for backend '{target.backend}', which is not built; "
            f"available backends: {', '.join(sorted(_BACKENDS))}"
        )
    if not cls.estimates and not hardware_present(target):
        if allow_estimate and target.can_estimate:
            _logger.warning(
                "target '%s' (%s) is not on this machine (found: %s); its latencies are "
                "roofline ESTIMATES from its peak figures, not measurements",
                target.name, target.hardware or target.device, device_name(target),
            )
            backend = RooflineEstimator(target)
            backend.check()
            return backend
        if target.device == "cuda" and device_name(target) == "no CUDA GPU":
            raise BackendUnavailableError(
                f"backend '{cls.name}' needs a CUDA GPU; none found (target '{target.name}')"
            )
        raise BackendUnavailableError(
            f"target '{target.name}' needs {target.hardware or target.device}, this machine has "
            f"{device_name(target)}; measure its LUT on that machine (`hant lut build MODEL "
            f"--target {target.name} -o FILE`, then --lut FILE here) or allow a roofline "
            "estimate"
        )
    backend = cls(target)
    backend.check()
    return backend
