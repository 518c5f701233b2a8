"""Publishing without network: the upload goes through a recording client that stores the
folder like a hub would; the stored folder then loads with stock timm."""

import shutil
from types import SimpleNamespace

import pytest
import timm
import torch

import compressor
from compressor.publish import push_to_hub

from .fake_hub import FakeHub


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls, stores uploads in a local dir."""

    def __init__(self, root):
        self.root = root
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
        self.calls.append(("upload_folder", repo_id, revision))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"local://{repo_id}/commit/1")


def test_push_uploads_a_loadable_folder(tmp_path):
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet").eval()
    s = compressor.split(teacher)
    model = s.assemble(["teacher"] * (len(s.layers) - 1) + ["cb_bottle_3x3_ex0.125"]).eval()
    report = _report(model, s)
    result = compressor.Result(model, report, "test_resnet", {}, s.input_size)
    api = RecordingApi(tmp_path / "hub")
    url = result.push_to_hub("org/tiny", api=api)
    assert url == "local://org/tiny/commit/1"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0] == ("create_repo", "org/tiny", False, True)
    stored = tmp_path / "hub" / "org" / "tiny"
    assert (stored / "model.safetensors").is_file() and (stored / "onnx" / "model.onnx").is_file()
    x = torch.randn(1, *s.input_size)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{stored}", pretrained=True).eval()
        assert torch.allclose(model(x), loaded(x), atol=1e-5)


def test_push_refuses_a_non_model_folder(tmp_path):
    import pytest

    with pytest.raises(compressor.ModelError, match="no config.json"):
        push_to_hub(tmp_path, "org/x", api=RecordingApi(tmp_path))


def test_push_over_http_to_a_local_endpoint(tmp_path):
    from huggingface_hub import HfApi

    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet").eval()
    s = compressor.split(teacher)
    model = s.assemble(["teacher"] * len(s.layers)).eval()
    hub = FakeHub(tmp_path / "hub")
    try:
        out = compressor.save_pretrained(
            model, tmp_path / "out", teacher_name="test_resnet", teacher_args={},
            choices=model.choices, input_size=s.input_size, report=_report(model, s), onnx=False)
        api = HfApi(endpoint=hub.url, token="hf_test_token")
        url = push_to_hub(out, "org/tiny", api=api)
    finally:
        hub.close()
    assert url.endswith("/org/tiny/commit/abc123")
    paths = [p for _, p, _, _ in hub.requests]
    assert paths[0] == "/api/repos/create" and any("/commit/" in p for p in paths)
    stored = tmp_path / "hub" / "org" / "tiny" / "main"
    x = torch.randn(1, *s.input_size)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{stored}", pretrained=True).eval()
        assert torch.allclose(model(x), loaded(x), atol=1e-5)


def _report(model, s):
    return {
        "teacher_name": "test_resnet", "target": {"name": "cpu"},
        "teacher": {"latency_ms": {"predicted": 1.0, "measured": 1.0}, "top1": None},
        "student": {"latency_ms": {"predicted": 0.5, "measured": 0.5}, "top1": None,
                    "agreement": None, "choices": model.choices},
        "speedup": {"requested": 0.5, "predicted": 0.5, "measured": 0.5},
        "eval_images": 0, "layers": [la.name for la in s.layers],
    }


def _full_report(**over):
    """A report as `build_report` writes it, with every field the card and plots read."""
    r = {
        "teacher_name": "tf_efficientnet_lite0",
        "target": {"name": "cpu", "description": "this machine's CPU", "backend": "onnxruntime",
                   "device": "cpu", "precision": "fp32", "batch": 1, "estimated": False},
        "layers": ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0"],
        "teacher": {"latency_ms": {"predicted": 10.0, "measured": 12.0}, "top1": 74.0},
        "student": {"latency_ms": {"predicted": 5.0, "measured": 6.3}, "top1": 68.0,
                    "agreement": 80.0,
                    "choices": ["teacher", "efn_3x3_e3_se0.25", "identity", "teacher"]},
        "speedup": {"requested": 0.5, "predicted": 0.5, "measured": 0.525},
        "eval_images": 50, "labelled_eval_images": 50,
        "front": {"points": [
            {"speedup_requested": 0.5, "latency_ms": 5.0, "loss": 0.3, "choices": ["a"] * 4},
            {"speedup_requested": 0.8, "latency_ms": 7.9, "loss": 0.1, "choices": ["b"] * 4}],
            "teacher": {"latency_ms": 10.0, "loss": 0.0}},
        "layer_latency_ms": {"stem": 0.5, "head": 0.5, "teacher": [1.0, 3.0, 3.0, 2.0],
                             "student": [1.0, 1.0, 0.0, 2.0]},
        "complexity": {"input_size": [3, 224, 224],
                       "teacher": {"params_m": 4.65, "gmacs": 0.385, "activations_m": 6.74},
                       "student": {"params_m": 3.1, "gmacs": 0.2, "activations_m": 4.0}},
        "sources": {"teacher": {"weights": "packaged", "hub_id": "timm/tf_efficientnet_lite0.in1k",
                                "datasets": ["imagenet-1k"], "license": "apache-2.0"},
                    "data": "imagenet-sample", "val_data": None},
        "notes": [],
    }
    return r | over


def test_model_card_is_a_complete_hub_page():
    """The YAML reads back through huggingface_hub as the metadata a Hub page shows (timm's
    fields, base model, model-index with the measured figures); the body says how to load it
    from the Hub and locally, what was done and what was not measured."""
    from huggingface_hub import ModelCard

    from compressor.card import model_card

    text = model_card(_full_report(), "org/lite0-cpu-0.5")
    card = ModelCard(text)
    d = card.data
    assert (d.library_name, d.pipeline_tag, d.license) == ("timm", "image-classification",
                                                           "apache-2.0")
    assert d.base_model == "timm/tf_efficientnet_lite0.in1k" and d.datasets == ["imagenet-1k"]
    assert {"timm", "image-classification", "hant-target-cpu"} <= set(d.tags)
    assert d.model_name == "lite0-cpu-0.5"
    metrics = {e.metric_type: e for e in d.eval_results}
    assert set(metrics) == {"accuracy", "agreement", "latency", "speedup"}
    acc = metrics["accuracy"]
    assert acc.metric_value == 68.0 and acc.dataset_split == "held-out"
    assert acc.dataset_name == "imagenet-sample" and "50 images" in acc.metric_name
    assert metrics["agreement"].metric_value == 80.0
    lat = metrics["latency"]
    assert lat.metric_value == 6.3 and "measured end to end" in lat.metric_name
    assert lat.metric_args["target"] == "cpu" and lat.metric_args["backend"] == "onnxruntime"
    assert metrics["speedup"].metric_value == 0.525 and "requested 0.5" in metrics[
        "speedup"].metric_name
    body = card.text
    assert 'timm.create_model("hf-hub:org/lite0-cpu-0.5", pretrained=True)' in body
    assert "local-dir:" in body and "import timm, compressor" in body
    assert "![top-1 against latency](front.png)" in body and "(layers.png)" in body
    assert "| `blocks.1` | 2 | `efn_3x3_e3_se0.25`, `identity` |" in body
    assert "| params (M) | 4.650 | 3.100 |" in body and "| GMACs | 0.385 | 0.200 |" in body
    assert "50 held-out images" in body and "What it was not measured on" in body
    assert "The other budgets of this multi-budget run" in body
    assert "requested **0.5**, predicted 0.500, measured **0.525**" in body


def test_card_of_an_estimated_unlabelled_run_from_random_weights():
    """No base model for a teacher whose weights are not timm's pretrained ones; no accuracy
    metric without labels; a latency that was not measured says so."""
    from huggingface_hub import ModelCard

    from compressor.card import model_card

    r = _full_report(front=None, complexity=None,
                     sources={"teacher": {"weights": "random", "hub_id": None, "datasets": []},
                              "data": "imgs", "val_data": "val"})
    r["target"] = r["target"] | {"name": "v100", "estimated": True}
    r["teacher"] = {"latency_ms": {"predicted": 10.0, "measured": None}, "top1": None}
    r["student"] = r["student"] | {"top1": None,
                                   "latency_ms": {"predicted": 5.0, "measured": None}}
    r["speedup"] = {"requested": 0.5, "predicted": 0.5, "measured": None}
    card = ModelCard(model_card(r))
    assert card.data.base_model is None and card.data.datasets is None
    metrics = {e.metric_type: e for e in card.data.eval_results}
    assert "accuracy" not in metrics and metrics["agreement"].dataset_split.startswith("valid")
    assert metrics["latency"].metric_value == 5.0
    assert "LUT-predicted, not measured" in metrics["latency"].metric_name
    assert "roofline estimates" in card.text and "hf-hub:ORG/NAME" in card.text
    assert "params (M)" not in card.text and "other budgets" not in card.text


def test_commit_message_carries_the_headline_figures():
    from compressor.card import commit_message

    msg = commit_message(_full_report())
    assert msg == ("HANT tf_efficientnet_lite0 for cpu: measured speedup 0.525 (requested 0.5), "
                   "top-1 68.0% (teacher 74.0%) on 50 held-out images")


def test_front_plot_is_top1_against_measured_latency(tmp_path):
    from compressor.plots import front_data, write_plots

    r = _full_report(baseline={"top1": 60.0, "latency_ms": {"predicted": 5.5, "measured": 6.0}})
    d = front_data(r)
    assert d["metric"] == "top1" and d["latency"] == "measured"
    assert [(p["label"], p["latency_ms"], p["value"]) for p in d["points"]] == [
        ("teacher", 12.0, 74.0), ("student", 6.3, 68.0),
        ("baseline (blocks dropped)", 6.0, 60.0)]
    assert [b["latency_ms"] for b in d["budgets"]] == [6.0, pytest.approx(9.6)]
    paths = write_plots(r, tmp_path)
    for key in ("front", "layers"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # without a measurement the LUT's predictions; without labels, agreement (teacher 100)
    r["student"] = r["student"] | {"top1": None, "latency_ms": {"predicted": 5.0,
                                                                "measured": None}}
    d = front_data(r | {"baseline": None, "front": None})
    assert d["metric"] == "agreement" and d["latency"] == "predicted"
    assert [p["value"] for p in d["points"]] == [100.0, 80.0]
    assert [b["latency_ms"] for b in d["budgets"]] == [5.0]


def _student(kind: str):
    import ops_pool

    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet").eval()
    s = compressor.split(teacher)
    choices = ["teacher"] * len(s.layers)
    if kind == "repvgg":
        i = next(i for i, la in enumerate(s.layers)
                 if "repvgg_3x3_ex1.0" in ops_pool.valid_ops(la.in_shape, la.out_shape))
        choices[i] = "repvgg_3x3_ex1.0"
    else:
        choices[-1] = "cb_bottle_3x3_ex0.125"
    model = s.assemble(choices).train()
    with torch.no_grad():  # non-trivial BN statistics
        for _ in range(2):
            model(torch.randn(4, *s.input_size))
    return model.eval(), s


@pytest.mark.parametrize("kind", ["plain", "repvgg"])
def test_onnx_export_with_the_dynamo_exporter_matches_pytorch(kind, tmp_path, caplog):
    import numpy as np
    import onnx
    import onnxruntime as ort

    import ops_pool
    from compressor.publish import export_onnx

    model, s = _student(kind)
    path = export_onnx(model, s.input_size, tmp_path / "m.onnx")
    assert not [r for r in caplog.records if "exporter failed" in r.getMessage()]
    assert not list(tmp_path.glob("*.data"))  # one file, no external weights
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    fused = ops_pool.reparameterize(model)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == sum(
        isinstance(m, torch.nn.Conv2d) for m in fused.modules())  # the fused form
    x = torch.randn(3, *s.input_size)  # another batch size than the export's
    (y,) = ort.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        assert np.allclose(y, model(x).numpy(), atol=1e-4)


def test_onnx_export_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch, caplog):
    import numpy as np
    import onnxruntime as ort

    from compressor.publish import export_onnx

    real = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kw):
        if dynamo:
            raise RuntimeError("unsupported op aten::frobnicate")
        return real(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    model, s = _student("plain")
    path = export_onnx(model, s.input_size, tmp_path / "m.onnx")
    assert any("aten::frobnicate" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, *s.input_size)
    (y,) = ort.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        assert np.allclose(y, model(x).numpy(), atol=1e-4)


def test_hant_push_then_load_with_stock_timm_from_the_hub(tmp_path, monkeypatch):
    """`hant push DIR ORG/NAME --private --revision R` against a local endpoint: the repo is
    created private, the branch made, the folder committed to it with the headline figures as
    its message; then `timm.create_model("hf-hub:ORG/NAME@R", pretrained=True)` (after
    `import compressor`) gives the same outputs, and the card on the Hub names the repo."""
    from click.testing import CliRunner
    from huggingface_hub import ModelCard

    from compressor.cli import hant

    model, s = _student("plain")
    report = _full_report(teacher_name="test_efficientnet", layers=[la.name for la in s.layers],
                          front=None, layer_latency_ms=None)
    report["student"] = report["student"] | {"choices": list(model.choices)}
    out = compressor.save_pretrained(
        model, tmp_path / "out", teacher_name="test_efficientnet", teacher_args={},
        choices=model.choices, input_size=s.input_size, report=report, onnx=False)
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    hub.use_for_downloads(monkeypatch, tmp_path / "cache")
    try:
        res = CliRunner().invoke(hant, ["push", str(out), "org/tiny", "--private",
                                        "--revision", "v1"])
        assert res.exit_code == 0, res.output
        assert "hf_secret_token" not in res.output
        assert res.output.strip() == f"uploaded to {hub.url}/org/tiny/commit/abc123"
        with torch.no_grad():
            loaded = timm.create_model("hf-hub:org/tiny@v1", pretrained=True).eval()
            x = torch.randn(2, *s.input_size)
            assert torch.allclose(model(x), loaded(x), atol=1e-5)
    finally:
        hub.close()
    create = next(body for m, p, _, body in hub.requests if p == "/api/repos/create")
    assert create["name"] == "tiny"
    assert create.get("visibility") == "private" or create.get("private") is True  # by version
    assert any(p == "/api/models/org/tiny/branch/v1" for _, p, _, _ in hub.requests)
    (commit,) = hub.commits
    assert commit["revision"] == "v1"
    assert commit["summary"].startswith("HANT test_efficientnet for cpu: measured speedup 0.525")
    stored = tmp_path / "hub" / "org" / "tiny" / "v1"
    assert {"model.safetensors", "config.json", "README.md", "front.png",
            "report.json"} <= {p.name for p in stored.iterdir()}
    card = ModelCard.load(stored / "README.md")
    assert 'create_model("hf-hub:org/tiny", pretrained=True)' in card.text
    assert card.data.model_name == "tiny"


def test_a_refused_upload_is_one_line_without_the_token(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from compressor.cli import hant

    model, s = _student("plain")
    out = compressor.save_pretrained(
        model, tmp_path / "out", teacher_name="test_efficientnet", teacher_args={},
        choices=model.choices, input_size=s.input_size, report=_report(model, s), onnx=False)
    hub = FakeHub(tmp_path / "hub", fail_with=401)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    hub.use_for_downloads(monkeypatch, tmp_path / "cache")
    try:
        res = CliRunner().invoke(hant, ["push", str(out), "org/tiny"])
    finally:
        hub.close()
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert "upload to org/tiny failed" in res.output and "hf_secret_token" not in res.output
    assert hub.requests[0][2] == "Bearer hf_secret_token"  # sent, never printed
    res = CliRunner().invoke(hant, ["push", str(out), "not a repo"])
    assert res.exit_code == 2 and "is not a Hub repo id" in res.output


def test_complexity_counts_params_macs_and_activations():
    """The figures timm's model cards give, counted by torch's flop counter: MACs are half its
    FLOPs; activations are the outputs of the counted ops (conv, matmul), as fvcore counts."""
    from torch import nn

    from compressor.complexity import complexity

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 10)).train()
    got = complexity(net, (3, 32, 32))
    assert got["params_m"] == round((3 * 9 * 16 + 16 + 16 * 10 + 10) / 1e6, 6)
    assert got["gmacs"] == round((16 * 32 * 32 * 27 + 16 * 10) / 1e9, 6)
    assert got["activations_m"] == round((16 * 32 * 32 + 10) / 1e6, 6)
    assert net.training  # the mode is restored
