"""TensorRT backend: one engine per op (ONNX -> TensorRT), timed with CUDA events."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ._base import Backend, onnx_bytes, torch_dtype
from ._errors import BackendUnavailableError
from .timing import Measurement, measure_stable

__all__ = ["TensorRTBackend"]


class TensorRTBackend(Backend):
    """Builds a TensorRT engine for each op at the target's batch and precision (FP16 flag for
    fp16), binds torch CUDA tensors as I/O, and times ``execute_async_v3`` with CUDA events.

    Needs ``tensorrt`` (8.6 or 10.x) and a CUDA GPU; `check` says which is missing.

    Example:
        >>> import latency_luts, torch
        >>> b = latency_luts.get_backend(latency_luts.get_target("h100"))  # doctest: +SKIP
        >>> b.measure(torch.nn.Conv2d(64, 64, 3, padding=1), (64, 56, 56))  # doctest: +SKIP
    """

    name = "tensorrt"
    package = "tensorrt"
    devices = ("cuda",)
    precisions = ("fp32", "fp16")
    workspace_bytes = 1 << 30

    def _engine(self, model: bytes):
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        flags = 0
        if int(trt.__version__.split(".")[0]) < 10:
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(model):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailableError(f"TensorRT cannot parse the op's ONNX graph: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self.target.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendUnavailableError("TensorRT failed to build an engine for the op")
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        return trt, engine

    def measure(self, module: nn.Module, in_shape: tuple[int, ...]) -> Measurement:
        self.check()
        dtype = torch_dtype(self.target.precision)
        module = copy.deepcopy(module).eval().to("cuda", dtype)
        x = torch.randn(self.target.batch, *in_shape, device="cuda", dtype=dtype)
        with torch.no_grad():
            trt, engine = self._engine(onnx_bytes(module, x))
        context = engine.create_execution_context()
        buffers = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffers[name] = x
            else:
                shape = tuple(engine.get_tensor_shape(name))
                np_dtype = trt.nptype(engine.get_tensor_dtype(name))
                out_dtype = torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype
                buffers[name] = torch.empty(shape, device="cuda", dtype=out_dtype)
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.Stream()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)

        return measure_stable(run)

    def fingerprint(self) -> dict:
        import tensorrt as trt

        return {"torch": torch.__version__, "tensorrt": trt.__version__,
                "cuda": torch.version.cuda}
