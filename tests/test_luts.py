import json

import pytest
import torch
from torch import nn

import latency_luts
from latency_luts import LUT, LutError


def test_targets_listed_and_unknown_target():
    assert "cpu" in latency_luts.list_targets()
    with pytest.raises(latency_luts.UnknownTargetError, match="known targets: .*cpu"):
        latency_luts.get_target("tpu9000")


def test_lut_roundtrip(tmp_path):
    lut = LUT(latency_luts.get_target("cpu"), fingerprint={"device": "x"})
    lut.set("identity", (8, 4, 4), (8, 4, 4), 0.5, 0.01, 10)
    path = lut.save(tmp_path / "lut.json")
    back = LUT.load(path)
    assert back.get("identity", (8, 4, 4), (8, 4, 4)) == 0.5
    assert back.get("identity", (8, 2, 2), (8, 2, 2)) is None
    d = json.loads(path.read_text())
    assert d["format"] == "hant-lut" and d["version"] == latency_luts.VERSION
    assert list(d["entries"]) == ["identity|8x4x4|8x4x4|b1|fp32"]
    assert path.stat().st_mode & 0o777 == 0o644  # readable like any artifact
    assert [p.name for p in tmp_path.iterdir()] == ["lut.json"]  # no temp file left


def test_corrupt_and_foreign_lut(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "hant-lut", "version": 1, "entr')
    with pytest.raises(LutError, match="corrupt"):
        LUT.load(bad)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"some": "thing"}))
    with pytest.raises(LutError, match="not a HANT latency table"):
        LUT.load(foreign)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "hant-lut", "version": 99}))
    with pytest.raises(LutError, match="version 99"):
        LUT.load(old)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({"format": "hant-lut", "version": 1, "target": {"name": "cpu"},
                                   "entries": {"k": {"op": "x"}}}))
    with pytest.raises(LutError, match="damaged"):
        LUT.load(damaged)


def test_onnxruntime_measures_bigger_op_slower():
    backend = latency_luts.get_backend(latency_luts.get_target("cpu"))
    small = backend.measure(nn.Conv2d(8, 8, 1), (8, 16, 16))
    big = backend.measure(nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)]),
                          (64, 32, 32))
    assert 0 < small.ms < big.ms
    assert small.runs >= 20 and small.spread_ms >= 0


def test_onnx_export_matches_torch():
    import onnxruntime as ort

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    sess = ort.InferenceSession(latency_luts.onnx_bytes(m, x))
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(y), m(x), atol=1e-5)
