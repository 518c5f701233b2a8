"""onnxruntime backend: the CPU execution provider, or the CUDA one (onnxruntime-gpu)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ._base import Backend, onnx_bytes, torch_dtype
from ._errors import BackendUnavailableError
from .timing import Measurement, measure_stable

__all__ = ["OnnxRuntimeBackend"]


def _cpu_call(sess, name: str, x: np.ndarray) -> Callable[[], None]:
    """Input and outputs bound to buffers made once, so that a timed call computes and writes
    its output in place, as an op inside a whole network does with its arena's buffers.

    ``sess.run(feed)`` instead allocates every output afresh and copies it into a new numpy
    array on each call: a cost per byte of output that the op does not pay inside the network,
    so that sums of ops timed that way over-predict the network (latency_luts/README.md,
    "Why isolated timings need not add up")."""
    import onnxruntime as ort

    outs = sess.run(None, {name: x})  # once, for the output shapes and dtypes
    binding = sess.io_binding()
    # the OrtValues wrap these arrays without owning them: the partial keeps both alive
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in [x, *map(np.empty_like, outs)]]
    binding.bind_ortvalue_input(name, values[0])
    for meta, value in zip(sess.get_outputs(), values[1:]):
        binding.bind_ortvalue_output(meta.name, value)

    return functools.partial(_run_bound, sess, binding, values)


def _run_bound(sess, binding, _buffers: list) -> None:
    sess.run_with_iobinding(binding)


class OnnxRuntimeBackend(Backend):
    """onnxruntime with a fixed thread count; CPU EP, or CUDA EP (I/O bound on the GPU).

    Example:
        >>> import latency_luts, torch
        >>> b = latency_luts.get_backend(latency_luts.get_target("cpu"))
        >>> b.measure(torch.nn.Conv2d(8, 8, 1), (8, 16, 16)).ms > 0
        True
    """

    name = "onnxruntime"
    package = "onnxruntime"
    timing = "io-bound"  # outputs written into buffers bound once (`_cpu_call`)
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")

    def check(self) -> None:
        super().check()
        if self.target.device == "cpu" and self.target.precision != "fp32":
            raise BackendUnavailableError(
                "the onnxruntime CPU backend measures fp32 only, target "
                f"'{self.target.name}' asks {self.target.precision}"
            )
        if self.target.device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    f"target '{self.target.name}' needs onnxruntime's CUDA execution provider: "
                    "pip install onnxruntime-gpu"
                )

    def session(self, model_bytes: bytes):
        """An inference session on the target's execution provider and thread count."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.target.num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = (["CUDAExecutionProvider"] if self.target.device == "cuda"
                     else ["CPUExecutionProvider"])
        return ort.InferenceSession(model_bytes, opts, providers=providers)

    def _measure_shape(self, module: nn.Module, shape: tuple[int, ...], **kw) -> Measurement:
        return self._timer(module, shape, **kw)()

    def timer(self, module: nn.Module, in_shape: tuple[int, ...]) -> Callable[[], Measurement]:
        return self._timer(module, (self.target.batch, *in_shape))

    def _timer(self, module: nn.Module, shape: tuple[int, ...], **kw) -> Callable[[], Measurement]:
        self.check()
        dtype = torch_dtype(self.target.precision)
        module = module.eval()
        if self.target.device == "cuda":
            module = copy.deepcopy(module).to("cuda", dtype)
            example = torch.randn(*shape, device="cuda", dtype=dtype)
        else:
            example = torch.randn(*shape)
        with torch.no_grad():
            sess = self.session(onnx_bytes(module, example))
        name = sess.get_inputs()[0].name
        if self.target.device == "cpu":
            return functools.partial(measure_stable, _cpu_call(sess, name, example.numpy()),
                                     clock=self.target.clock, **kw)
        binding = sess.io_binding()
        binding.bind_input(name, "cuda", 0, example.cpu().numpy().dtype, tuple(example.shape),
                           example.data_ptr())
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cuda")
        binding.synchronize_inputs()

        def run(_bound=example):  # the binding reads `example`'s memory: kept alive here
            sess.run_with_iobinding(binding)  # synchronises the device at the end

        return functools.partial(measure_stable, run, **kw)

    def measure(self, module: nn.Module, in_shape: tuple[int, ...]) -> Measurement:
        return self._measure_shape(module, (self.target.batch, *in_shape))

    def overhead_ms(self) -> float:
        """One session call on a 1-element identity graph: the per-call cost (binding inputs,
        allocating outputs, Python) that each op's measurement includes once and a whole network
        pays once too."""
        m = self._measure_shape(nn.Identity(), (1,), min_runs=200, min_seconds=0.2)
        return m.ms

    def fingerprint(self) -> dict:
        import onnxruntime as ort

        return {"torch": torch.__version__, "onnxruntime": ort.__version__, "timing": self.timing,
                "execution_provider": ("CUDAExecutionProvider" if self.target.device == "cuda"
                                       else "CPUExecutionProvider")}
