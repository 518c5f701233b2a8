"""Backends: roofline estimates, torch and onnxruntime measurements, clear errors."""

import dataclasses

import pytest
import torch
from torch import nn

import latency_luts
from latency_luts import BackendUnavailableError, Target, backends, measure_stable

HAS_CUDA = torch.cuda.is_available()


def _conv(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())


@pytest.fixture
def no_v100(monkeypatch):
    monkeypatch.setattr(backends, "hardware_present", lambda t: False)


def test_estimator_positive_monotone_and_marked(no_v100):
    est = latency_luts.get_backend("v100", allow_estimate=True)
    assert isinstance(est, latency_luts.RooflineEstimator)
    ms = [est.measure(_conv(c), (c, 28, 28)) for c in (8, 32, 128, 512)]
    assert all(m.estimated and m.ms > 0 and m.runs == 0 for m in ms)
    assert [m.ms for m in ms] == sorted(m.ms for m in ms) and ms[-1].ms > 10 * ms[1].ms
    # TensorRT-like fusion: BN + ReLU after a conv add nothing
    assert est.measure(nn.Conv2d(64, 64, 3, padding=1), (64, 28, 28)).ms == pytest.approx(
        est.measure(_conv(64), (64, 28, 28)).ms)
    # batch 1 is cheaper than the profile's batch 128
    b1 = latency_luts.RooflineEstimator(
        dataclasses.replace(latency_luts.get_target("v100"), name="b1", batch=1))
    assert b1.measure(_conv(128), (128, 28, 28)).ms < ms[2].ms


def test_estimator_does_not_move_the_module():
    est = latency_luts.RooflineEstimator(latency_luts.get_target("xeon"))
    m = _conv(16)
    assert est.measure(m, (16, 8, 8)).ms > 0
    assert next(m.parameters()).device.type == "cpu"


@pytest.mark.parametrize("op,shape", [
    ("efnlite_3x3_e4", (16, 16, 16)), ("repvgg_3x3_ex1.0", (16, 16, 16)),
    ("cb_bottle_5x5_ex0.25", (16, 16, 16)), ("vit_d1_w32_h4", (16, 16, 16)),
    ("mlp_e0.25", (17, 32)),
])
def test_meta_built_op_traces_like_a_built_one(op, shape):
    """The estimator's fast path (the op built on the meta device, its activations' and batch
    norm's outputs made from shapes) records the same kernels as tracing a real module on this
    CPU (attention as its math, which is what meta tensors run)."""
    import ops_pool
    from latency_luts import roofline

    if op not in ops_pool.valid_ops(shape, shape):
        pytest.skip(f"{op} does not fit {shape}")
    real = ops_pool.reparameterize(ops_pool.build(op, shape, shape)).eval()
    meta = ops_pool.build(op, shape, shape, meta=True)
    with torch.device("meta"):
        meta = ops_pool.reparameterize(meta, inplace=True)
    fast = roofline.trace_kernels(meta, shape)
    assert next(meta.parameters()).device.type == "meta"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        reference = roofline._trace(real, torch.randn(1, *shape))
    assert fast == reference and len(fast) >= 2


def test_meta_build_skips_init_only_on_meta():
    """Inside ops_pool's meta build, torch's layers skip their init when on the meta device;
    a module built meanwhile on the CPU (another thread) is initialised, and the layers'
    own reset_parameters is back afterwards."""
    import threading

    from ops_pool._meta import on_meta

    original = torch.nn.Conv2d.reset_parameters
    built = {}
    with on_meta():
        meta = torch.nn.Conv2d(4, 4, 3)
        worker = threading.Thread(target=lambda: built.setdefault(
            "cpu", torch.nn.Conv2d(4, 4, 3, device="cpu")))
        worker.start()
        worker.join()
    assert meta.weight.is_meta
    assert built["cpu"].weight.abs().sum() > 0 and built["cpu"].bias.abs().sum() > 0
    assert torch.nn.Conv2d.reset_parameters is original


def test_estimator_needs_peak_figures():
    with pytest.raises(BackendUnavailableError, match="no peak figures"):
        latency_luts.RooflineEstimator(latency_luts.get_target("cpu")).check()


def test_hardware_absent_without_estimate_is_refused(no_v100):
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU; none found|needs NVIDIA"):
        latency_luts.get_backend("v100")


def test_torch_cpu_backend_measures_and_restores_threads():
    before = torch.get_num_threads()
    b = latency_luts.get_backend(Target("t", backend="torch", threads=1))
    assert isinstance(b, latency_luts.TorchBackend)
    small = b.measure(nn.Conv2d(8, 8, 1), (8, 16, 16))
    big = b.measure(_conv(64), (64, 32, 32))
    assert 0 < small.ms < big.ms and small.runs >= 20 and small.spread_ms >= 0
    assert torch.get_num_threads() == before
    assert b.fingerprint()["torch_threads"] == 1


def test_onnxruntime_overhead_small_and_positive():
    b = latency_luts.get_backend("cpu")
    oh = b.overhead_ms()
    assert 0 < oh < b.measure(_conv(32), (32, 28, 28)).ms


def test_onnxruntime_cpu_timing_binds_outputs_once(monkeypatch):
    """A timed call writes into buffers bound once (no output allocated or copied per call,
    which ops inside a network do not pay either); `timer` keeps its session for repeats."""
    import onnxruntime as ort

    b = latency_luts.get_backend("cpu")
    runs = {"run": 0, "bound": 0}
    real_run, real_bound = ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding

    def run(self, *a, **k):
        runs["run"] += 1
        return real_run(self, *a, **k)

    def bound(self, *a, **k):
        runs["bound"] += 1
        return real_bound(self, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", bound)
    sessions = []
    real_session = b.session
    monkeypatch.setattr(b, "session", lambda data: sessions.append(1) or real_session(data))
    timer = b.timer(_conv(16), (16, 28, 28))
    first, second = timer(), timer()
    assert first.ms > 0 and second.ms > 0 and len(sessions) == 1
    assert runs["run"] == 1 and runs["bound"] >= first.runs + second.runs  # 1: output shapes


def test_paired_measurement_holds_the_ratio_on_a_drifting_machine():
    """Each call is slower than the one before (the machine drifting): timed one after the
    other, a and b differ by the drift; timed in alternation their ratio stays the truth."""
    clock = {"drift": 1.0}

    def timer(ms):
        def measure():
            clock["drift"] *= 1.3
            return latency_luts.Measurement(ms * clock["drift"], 0.0, 1)
        return measure

    a, b = timer(10.0), timer(5.0)
    apart = b().ms / a().ms  # what two separate measurements give
    pm = latency_luts.measure_paired(a, b, rounds=5)
    assert abs(apart - 0.5) > 0.1
    # a first, b first, a first, ...: consecutive rounds cancel the drift
    assert pm.rounds == 5 and pm.ratio == pytest.approx(0.5, rel=1e-9)
    assert pm.ratio_spread > 0.2  # the single rounds did see the drift
    with pytest.raises(ValueError, match="rounds"):
        latency_luts.measure_paired(a, b, rounds=0)


def test_measure_stable_uses_returned_times():
    m = measure_stable(lambda: 2.5, min_runs=20)
    assert m.ms == 2.5 and m.spread_ms == 0 and m.stable and m.runs >= 20


def test_missing_package_names_pip_package(monkeypatch):
    monkeypatch.setattr(latency_luts.OnnxRuntimeBackend, "available", classmethod(lambda c: False))
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime"):
        latency_luts.get_backend("cpu")
    monkeypatch.setattr(backends, "hardware_present", lambda t: True)
    monkeypatch.setattr("latency_luts._base.gpu_name", lambda: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(latency_luts.TensorRTBackend, "available", classmethod(lambda c: False))
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        latency_luts.get_backend("v100")


def test_unknown_backend(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="available backends: onnxruntime"):
        latency_luts.get_backend(Target("x", backend="openvino"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_gpu_backend_without_gpu_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' needs a CUDA GPU; none"):
        latency_luts.get_backend("h100")
    with pytest.raises(BackendUnavailableError, match="backend 'torch' needs a CUDA GPU; none"):
        latency_luts.get_backend("cuda")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU; none found"):
        latency_luts.TorchBackend(Target("g", backend="torch", device="cuda")).check()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_torch_cuda_backend_measures():
    b = latency_luts.get_backend(Target("g", backend="torch", device="cuda", precision="fp16",
                                        batch=8, channels_last=True))
    m = b.measure(_conv(64), (64, 56, 56))
    assert m.ms > 0 and m.runs >= 20 and not m.estimated


@pytest.mark.skipif(not (HAS_CUDA and latency_luts.TensorRTBackend.available()),
                    reason="needs a CUDA GPU and tensorrt")
def test_tensorrt_backend_measures():
    b = latency_luts.TensorRTBackend(Target("trt", backend="tensorrt", device="cuda",
                                            precision="fp16", batch=8))
    assert b.measure(_conv(64), (64, 56, 56)).ms > 0
