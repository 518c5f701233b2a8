"""Hardware latency look-up tables: targets, measuring backends, estimates, LUT files.

Example:
    >>> import latency_luts
    >>> target = latency_luts.get_target("cpu")
    >>> lut = latency_luts.LUT(target)
    >>> backend = latency_luts.get_backend("v100", allow_estimate=True)  # estimates without one
"""

from ._errors import BackendUnavailableError, LutError, UnknownTargetError
from ._tables import list_tables, shipped_table
from .backends import (
    Backend,
    Measurement,
    OnnxRuntimeBackend,
    RooflineEstimator,
    TensorRTBackend,
    TorchBackend,
    get_backend,
    list_backends,
    onnx_bytes,
    timing_method,
)
from .calibration import fit_calibration
from .fingerprint import environment_fingerprint
from .hardware import cpu_model, device_name, gpu_name, hardware_present
from .lut import FORMAT, LUT, VERSION, entry_key
from .target import PRECISIONS, Target, get_target, list_targets, register_target
from .timing import PairedMeasurement, measure_paired, measure_stable

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "FORMAT",
    "LUT",
    "LutError",
    "Measurement",
    "OnnxRuntimeBackend",
    "PairedMeasurement",
    "PRECISIONS",
    "RooflineEstimator",
    "Target",
    "TensorRTBackend",
    "TorchBackend",
    "UnknownTargetError",
    "VERSION",
    "cpu_model",
    "device_name",
    "entry_key",
    "environment_fingerprint",
    "fit_calibration",
    "get_backend",
    "get_target",
    "gpu_name",
    "hardware_present",
    "list_backends",
    "list_tables",
    "list_targets",
    "measure_paired",
    "measure_stable",
    "onnx_bytes",
    "register_target",
    "shipped_table",
    "timing_method",
]
