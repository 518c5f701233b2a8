"""Hardware latency look-up tables: targets, measuring backends, LUT files.

Example:
    >>> import latency_luts
    >>> target = latency_luts.get_target("cpu")
    >>> lut = latency_luts.LUT(target)
"""

from ._errors import BackendUnavailableError, LutError, UnknownTargetError
from .backends import Backend, Measurement, OnnxRuntimeBackend, get_backend, onnx_bytes
from .fingerprint import environment_fingerprint
from .lut import FORMAT, LUT, VERSION, entry_key
from .target import Target, get_target, list_targets, register_target

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "FORMAT",
    "LUT",
    "LutError",
    "Measurement",
    "OnnxRuntimeBackend",
    "Target",
    "UnknownTargetError",
    "VERSION",
    "entry_key",
    "environment_fingerprint",
    "get_backend",
    "get_target",
    "list_targets",
    "onnx_bytes",
    "register_target",
]
