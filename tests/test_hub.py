"""Publishing without network: the upload goes through a recording client that stores the
folder like a hub would; the stored folder then loads with stock timm."""

import shutil
from types import SimpleNamespace

import timm
import torch

import compressor
from compressor.publish import push_to_hub


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls, stores uploads in a local dir."""

    def __init__(self, root):
        self.root = root
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"local://{repo_id}/commit/1")


def test_push_uploads_a_loadable_folder(tmp_path):
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet").eval()
    s = compressor.split(teacher)
    model = s.assemble(["teacher"] * (len(s.layers) - 1) + ["cb_bottle_3x3_ex0.125"]).eval()
    report = {
        "teacher_name": "test_resnet", "target": {"name": "cpu"},
        "teacher": {"latency_ms": {"predicted": 1.0, "measured": 1.0}, "top1": None},
        "student": {"latency_ms": {"predicted": 0.5, "measured": 0.5}, "top1": None,
                    "agreement": None, "choices": model.choices},
        "speedup": {"requested": 0.5, "predicted": 0.5, "measured": 0.5},
        "eval_images": 0, "layers": [la.name for la in s.layers],
    }
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
