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


class _FakeHub:
    """A local HTTP endpoint speaking the few Hub routes an upload uses (create repo, validate
    the card's YAML, preupload, commit); files arrive inline ("regular" upload mode)."""

    def __init__(self, root):
        import base64
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.root = root
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append((self.path, self.headers.get("authorization")))
                base = f"http://127.0.0.1:{self.server.server_port}"
                if self.path == "/api/repos/create":
                    d = json.loads(body)
                    return self._reply({"url": f"{base}/{d['organization']}/{d['name']}"})
                if self.path.startswith("/api/validate-yaml"):
                    return self._reply({})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply({"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if "/commit/" in self.path:
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            dest = hub.root / repo / v["path"]
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(base64.b64decode(v["content"]))
                    return self._reply({"commitUrl": f"{base}/{repo}/commit/abc123",
                                        "commitOid": "abc123"})
                self.send_response(404)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_push_over_http_to_a_local_endpoint(tmp_path):
    from huggingface_hub import HfApi

    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet").eval()
    s = compressor.split(teacher)
    model = s.assemble(["teacher"] * len(s.layers)).eval()
    hub = _FakeHub(tmp_path / "hub")
    try:
        out = compressor.save_pretrained(
            model, tmp_path / "out", teacher_name="test_resnet", teacher_args={},
            choices=model.choices, input_size=s.input_size, report=_report(model, s), onnx=False)
        api = HfApi(endpoint=hub.url, token="hf_test_token")
        url = push_to_hub(out, "org/tiny", api=api)
    finally:
        hub.close()
    assert url.endswith("/org/tiny/commit/abc123")
    paths = [p for p, _ in hub.requests]
    assert paths[0] == "/api/repos/create" and any("/commit/" in p for p in paths)
    stored = tmp_path / "hub" / "org" / "tiny"
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
