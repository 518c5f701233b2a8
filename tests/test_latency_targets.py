"""Target profiles, hardware detection, LUT compatibility and mismatch messages."""

import json

import pytest
import timm

import latency_luts
from compressor.latency import can_measure, layer_latencies, lut_for_build, resolve_target
from compressor.split import split
from compressor.store import Store
from latency_luts import LUT, LutError, Target, hardware

PAPER_GPUS = ("v100", "a100", "h100", "t4", "l4")


def test_profiles_listed_with_paper_settings():
    names = latency_luts.list_targets()
    for n in ("cpu", "xeon", *PAPER_GPUS):
        assert n in names
    for n in PAPER_GPUS:
        t = latency_luts.get_target(n)
        assert (t.backend, t.device, t.precision, t.batch) == ("tensorrt", "cuda", "fp16", 128)
        assert t.can_estimate and t.source
    xeon = latency_luts.get_target("xeon")
    assert (xeon.backend, xeon.device, xeon.precision, xeon.batch) == ("torch", "cpu", "fp32", 1)
    cpu = latency_luts.get_target("cpu")
    assert (cpu.backend, cpu.threads, cpu.batch) == ("onnxruntime", 1, 1)


def test_unknown_target_lists_known_ones():
    with pytest.raises(latency_luts.UnknownTargetError, match="known targets: a100, cpu.*v100"):
        latency_luts.get_target("tpu9000")


def test_hardware_detection(monkeypatch):
    assert latency_luts.hardware_present(latency_luts.get_target("cpu"))
    monkeypatch.setattr(hardware, "cpu_model", lambda: "AMD EPYC 7B13")
    assert not latency_luts.hardware_present(latency_luts.get_target("xeon"))
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Intel(R) Xeon(R) Silver 4114 CPU")
    assert latency_luts.hardware_present(latency_luts.get_target("xeon"))
    monkeypatch.setattr(hardware, "gpu_name", lambda: "Tesla V100-SXM2-16GB")
    present = {n for n in PAPER_GPUS if latency_luts.hardware_present(latency_luts.get_target(n))}
    assert present == {"v100"}
    monkeypatch.setattr(hardware, "gpu_name", lambda: "NVIDIA L40S")
    assert not latency_luts.hardware_present(latency_luts.get_target("l4"))
    monkeypatch.setattr(hardware, "gpu_name", lambda: None)
    assert not latency_luts.hardware_present(latency_luts.get_target("cuda"))


def test_fingerprint_fields():
    t = latency_luts.get_target("cpu")
    fp = latency_luts.environment_fingerprint(t, latency_luts.get_backend(t).fingerprint())
    for k in ("device", "driver", "threads", "precision", "batch", "torch", "onnxruntime", "os"):
        assert k in fp
    assert (fp["threads"], fp["precision"], fp["batch"]) == (1, "fp32", 1)
    est = latency_luts.environment_fingerprint(latency_luts.get_target("h100"),
                                               {"estimated": True})
    assert est["device"].startswith("estimate: ") and est["backend"] == "roofline"


def test_lut_v2_fields_and_v1_still_read(tmp_path):
    lut = LUT(latency_luts.get_target("cpu"), overhead_ms=0.01)
    lut.set("identity", (8, 4, 4), (8, 4, 4), 0.5, estimated=True, raw_ms=0.51)
    d = json.loads(lut.save(tmp_path / "lut.json").read_text())
    assert d["version"] == latency_luts.VERSION == 3
    assert d["estimated"] is True and d["overhead_ms"] == 0.01
    assert d["entries"]["identity|8x4x4|8x4x4|b1|fp32"]["raw_ms"] == 0.51
    d["version"] = 1
    del d["overhead_ms"], d["estimated"]
    old = LUT.from_dict(d)
    assert old.overhead_ms == 0.0 and old.get("identity", (8, 4, 4), (8, 4, 4)) == 0.5


def test_precision_or_batch_mismatch_refused(tmp_path):
    v100 = LUT(latency_luts.get_target("v100"))
    path = v100.save(tmp_path / "v100.json")
    with pytest.raises(LutError, match=r"precision fp16 \(asked: fp32\), batch 128 \(asked: 1\)"):
        resolve_target("cpu", Store(tmp_path / "w"), lut=path)
    lut, where = resolve_target("v100", Store(tmp_path / "w"), lut=path)
    assert where is None and lut.target.name == "v100"
    d = v100.to_dict()
    d["entries"] = {"x|1|1|b1|fp32": {"op": "x", "ms": 1.0, "batch": 1, "precision": "fp32"}}
    with pytest.raises(LutError, match="damaged.*another precision or batch"):
        LUT.from_dict(d)


@pytest.fixture(scope="module")
def small_split():
    net = timm.create_model("test_efficientnet")
    return split(net, model_name="test_efficientnet")


def test_estimated_lut_and_mismatch_messages(small_split, tmp_path):
    s = small_split
    cands = {i: ["teacher"] for i in range(len(s.layers))}
    lut, path = resolve_target("v100", Store(tmp_path))
    assert path.name == "v100-estimate.json"
    b, stem, head = layer_latencies(s, "k", cands, lut, path, progress=False)
    assert lut.estimated and LUT.load(path).to_dict()["estimated"]
    assert stem > 0 and head > 0 and all(x["teacher"] > 0 for x in b)
    assert not can_measure(lut, path)
    ro = LUT.load(path)
    with pytest.raises(LutError, match=r"no entry for op 'stem@other' \(the stem.*another teacher"):
        layer_latencies(s, "other", cands, ro, None)
    more = dict(cands)
    more[2] = ["teacher", "no_such_op"]
    with pytest.raises(LutError, match=r"op 'no_such_op' \(layer 2 '.*', input .* -> output"):
        layer_latencies(s, "k", more, ro, None)


def test_target_roundtrips_through_dict():
    t = latency_luts.get_target("t4")
    assert Target.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_fit_calibration_scale_offset_and_refusals():
    from latency_luts import fit_calibration

    c = fit_calibration([10.0, 14.0, 20.0, 30.0], [7.1, 9.9, 14.1, 21.1])  # 0.7 x + 0.1
    assert c["scale"] == pytest.approx(0.7) and c["offset_ms"] == pytest.approx(0.1)
    assert c["fit_median_abs_err_pct"] < 0.01 < c["raw_median_abs_err_pct"]
    near = fit_calibration([10.0, 10.1, 10.2], [13.0, 13.13, 13.26])  # too close for an offset
    assert near["offset_ms"] == 0.0 and near["scale"] == pytest.approx(1.3)
    with pytest.raises(ValueError, match="3 or more"):
        fit_calibration([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_calibration([1.0, 2.0, 0.0], [1.0, 2.0, 3.0])


def test_lut_calibration_saved_applied_and_checked(small_split, tmp_path):
    s = small_split
    cands = {i: ["teacher"] for i in range(len(s.layers))}
    lut, path = resolve_target("v100", Store(tmp_path))
    b, stem, head = layer_latencies(s, "k", cands, lut, path, progress=False)
    lut.calibration = {"scale": 0.5, "offset_ms": 0.2, "archs": 4}
    lut.save(path)
    again = LUT.load(path)
    assert again.calibration["scale"] == 0.5 and again.network_ms(10.0) == pytest.approx(5.2)
    b2, stem2, head2 = layer_latencies(s, "k", cands, again, path, progress=False)
    raw = stem + head + sum(x["teacher"] for x in b)
    assert stem2 + head2 + sum(x["teacher"] for x in b2) == pytest.approx(0.2 + 0.5 * raw)
    d = again.to_dict()
    d["calibration"]["scale"] = -1
    with pytest.raises(LutError, match="damaged.*scale is not positive"):
        LUT.from_dict(d)
    d["version"] = 2
    del d["calibration"]
    assert LUT.from_dict(d).calibration is None and LUT.from_dict(d).network_ms(3.0) == 3.0


def test_calibrate_recovers_what_the_networks_measure(small_split, tmp_path, monkeypatch):
    """The fit is checked on networks it was not fitted on: measured here as 0.8 x sum + 0.3."""
    import random

    import ops_pool
    from compressor import latency
    from compressor.latency import calibrate, latency_table

    s = small_split
    small = ("cb_bottle_3x3_ex0.125", "efn_3x3_e1_se1.00")
    cands = {i: ["teacher"] + [op for op in ops_pool.valid_ops(la.in_shape, la.out_shape)
                               if op in small] for i, la in enumerate(s.layers)}
    assert all(len(c) == 3 for c in cands.values())
    lut, path = resolve_target("cpu", Store(tmp_path))
    layer_latencies(s, "k", cands, lut, path, progress=False)
    raw_b, raw_stem, raw_head = layer_latencies(s, "k", cands, lut, path, progress=False)

    def truth(choices):
        return 0.3 + 0.8 * (raw_stem + raw_head + sum(raw_b[i][op] for i, op in enumerate(choices)))

    made = []

    class _Fake:
        def __init__(self, ms):
            self.ms = ms

    def fake_measure(model, input_size, target):
        made.append(list(model.choices))
        return _Fake(truth(model.choices))

    monkeypatch.setattr(latency, "measure_model", fake_measure)
    c = calibrate(s, "k", cands, lut, path, archs=5, progress=False)
    assert len(made) == 5 and made[0] == ["teacher"] * len(s.layers)
    assert c["scale"] == pytest.approx(0.8) and c["offset_ms"] == pytest.approx(0.3)
    assert LUT.load(path).calibration["archs"] == 5
    rng = random.Random(7)
    for _ in range(5):  # other networks than the fitted ones
        arch = [rng.choice(cands[i]) for i in range(len(s.layers))]
        b, stem, head = layer_latencies(s, "k", cands, LUT.load(path), None, progress=False)
        assert stem + head + sum(b[i][op] for i, op in enumerate(arch)) == pytest.approx(
            truth(arch))
    # the LUT phase calibrates a new writable table once, and leaves a read-only one alone
    fresh, fresh_path = resolve_target("cpu", Store(tmp_path / "other"))
    lat = latency_table(s, "k", cands, fresh, fresh_path, progress=False, calibration_archs=4)
    assert lat.calibration["archs"] == 4 and lat.to_dict()["calibration"]["archs"] == 4
    made.clear()
    latency_table(s, "k", cands, LUT.load(fresh_path), fresh_path, progress=False,
                  calibration_archs=4)
    ro = LUT.load(path)
    ro.calibration = None
    latency_table(s, "k", cands, ro, None, progress=False, calibration_archs=4)
    assert made == [] and ro.calibration is None


def test_work_dir_lut_timed_the_old_way_is_measured_again(small_split, tmp_path, caplog):
    """Entries timed with outputs copied on every call (before `timing` was recorded) do not
    add up like the io-bound ones; a work-dir LUT made that way is measured again."""
    s = small_split
    cands = {i: ["teacher"] for i in range(len(s.layers))}
    lut, path = resolve_target("cpu", Store(tmp_path))
    layer_latencies(s, "k", cands, lut, path, progress=False)
    assert lut.fingerprint["timing"] == latency_luts.timing_method("cpu") == "io-bound"
    kept, _ = resolve_target("cpu", Store(tmp_path))
    assert len(kept.entries) == len(lut.entries) > 0
    del lut.fingerprint["timing"]  # as an older version wrote it
    lut.save(path)
    with caplog.at_level("WARNING"):
        again, _ = resolve_target("cpu", Store(tmp_path))
    assert not again.entries and "timed the way of an older version" in caplog.text
    with caplog.at_level("WARNING"):
        assert not lut_for_build(path, "cpu").entries  # `hant lut build -o` measures anew too
