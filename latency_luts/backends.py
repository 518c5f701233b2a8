"""Measuring backends: objects with ``available()`` and ``measure(module, in_shape)``."""

from __future__ import annotations

import io
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import BackendUnavailableError
from .target import Target

__all__ = ["Measurement", "Backend", "OnnxRuntimeBackend", "get_backend"]


@dataclass
class Measurement:
    """Median latency of one call in milliseconds and the spread (p90 - p10) of the samples."""

    ms: float
    spread_ms: float
    runs: int


def _timed(fn, min_runs: int, min_seconds: float, max_runs: int) -> Measurement:
    for _ in range(3):  # warm-up
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (
        len(samples) < min_runs or time.perf_counter() - start < min_seconds
    ):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    samples.sort()
    p10 = samples[int(0.1 * (len(samples) - 1))]
    p90 = samples[int(0.9 * (len(samples) - 1))]
    return Measurement(statistics.median(samples), p90 - p10, len(samples))


class Backend:
    """Base class; subclasses measure one module at one input shape."""

    name = "base"
    package = ""

    def __init__(self, target: Target):
        self.target = target

    @classmethod
    def available(cls) -> bool:
        raise NotImplementedError

    def measure(self, module: nn.Module, in_shape: tuple[int, ...]) -> Measurement:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        return {"torch": torch.__version__}


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """`module` as ONNX bytes (TorchScript exporter: fast for small graphs)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), buf, dynamo=False, input_names=["x"], output_names=["y"],
            opset_version=17,
        )
    return buf.getvalue()


class OnnxRuntimeBackend(Backend):
    """onnxruntime with the CPU execution provider, fixed thread count."""

    name = "onnxruntime"
    package = "onnxruntime"

    @classmethod
    def available(cls) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def session(self, model_bytes: bytes):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.target.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])

    def measure(self, module: nn.Module, in_shape: tuple[int, ...]) -> Measurement:
        if self.target.precision != "fp32":
            raise BackendUnavailableError(
                "the onnxruntime CPU backend measures fp32 only, target asks "
                f"{self.target.precision}"
            )
        module = module.eval()
        example = torch.randn(self.target.batch, *in_shape)
        with torch.no_grad():
            sess = self.session(onnx_bytes(module, example))
        feed = {sess.get_inputs()[0].name: example.numpy()}
        return _timed(lambda: sess.run(None, feed), min_runs=20, min_seconds=0.15, max_runs=300)

    def fingerprint(self) -> dict:
        import onnxruntime as ort

        return {"torch": torch.__version__, "onnxruntime": ort.__version__}


_BACKENDS: dict[str, type[Backend]] = {"onnxruntime": OnnxRuntimeBackend}


def get_backend(target: Target) -> Backend:
    cls = _BACKENDS.get(target.backend)
    if cls is None:
        raise BackendUnavailableError(
            f"target '{target.name}' asks for backend '{target.backend}', which is not built; "
            f"available backends: {', '.join(sorted(_BACKENDS))}"
        )
    if not cls.available():
        raise BackendUnavailableError(
            f"backend '{cls.name}' for target '{target.name}' is not installed: "
            f"pip install {cls.package}"
        )
    return cls(target)
