"""A local HTTP endpoint speaking the few Hub routes an upload and a download use, so that
``huggingface_hub`` (and timm's ``hf-hub:`` loader on top of it) run unchanged against it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class FakeHub:
    """Create repo, branch, validate YAML, preupload, commit (files arrive inline: "regular"
    upload mode), and HEAD/GET ``/{repo}/resolve/{revision}/{path}``. Files are stored under
    ``root/ORG/NAME/REVISION/``. `requests` records (method, path, authorization header, body
    as JSON or None) of every call; `commits` the header of every commit.

    `fail_with` (an HTTP status, or ``"drop"``: close the connection without a reply) fails
    every POST, or with `fail_on` only those whose path contains it (``"commit"``: the upload
    gets as far as its last request); `failed` says whether it did."""

    def __init__(self, root: Path, fail_with: int | str | None = None,
                 fail_on: str | None = None):
        self.root = Path(root)
        self.requests: list[tuple[str, str, str | None, object]] = []
        self.commits: list[dict] = []
        self.fail_with = fail_with
        self.fail_on = fail_on
        self.failed = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None,
                      write: bool = True):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if write:
                    self.wfile.write(body)

            def _reply(self, obj):
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parsed = None
                with contextlib.suppress(ValueError):
                    parsed = json.loads(body)
                hub.requests.append(("POST", self.path, self.headers.get("authorization"),
                                     parsed))
                if hub.fail_with and (hub.fail_on is None or hub.fail_on in self.path):
                    hub.failed = True
                    if hub.fail_with == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    return self._send(hub.fail_with, b'{"error": "Invalid credentials"}',
                                      {"Content-Type": "application/json"})
                base = f"http://127.0.0.1:{self.server.server_port}"
                if self.path == "/api/repos/create":
                    return self._reply({"url": f"{base}/{parsed['organization']}/"
                                               f"{parsed['name']}"})
                if self.path.startswith("/api/validate-yaml") or "/branch/" in self.path:
                    return self._reply({})
                if "/preupload/" in self.path:
                    return self._reply({"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in parsed["files"]]})
                if "/commit/" in self.path:
                    return self._commit(body, base)
                self._send(404)

            def _commit(self, body: bytes, base: str):
                repo, rev = self.path.split("/api/models/")[1].split("/commit/")
                rev = unquote(rev)
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        hub.commits.append(item["value"] | {"revision": rev})
                    if item["key"] == "file":
                        v = item["value"]
                        dest = hub.root / repo / rev / v["path"]
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(base64.b64decode(v["content"]))
                return self._reply({"commitUrl": f"{base}/{repo}/commit/abc123",
                                    "commitOid": "abc123"})

            def _resolve(self, write: bool):
                parts = self.path.split("?")[0].lstrip("/").split("/")
                hub.requests.append((self.command, self.path, None, None))
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._send(404, write=write)
                repo, rev = "/".join(parts[:2]), unquote(parts[3])
                file = hub.root / repo / rev / unquote("/".join(parts[4:]))
                commit = hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest()
                if not file.is_file():
                    return self._send(404, headers={"X-Error-Code": "EntryNotFound",
                                                    "X-Repo-Commit": commit}, write=write)
                data = file.read_bytes()
                self._send(200, data, {"X-Repo-Commit": commit,
                                       "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                       "Content-Type": "application/octet-stream"}, write)

            def do_HEAD(self):
                self._resolve(write=False)

            def do_GET(self):
                self._resolve(write=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def use_for_downloads(self, monkeypatch, cache: Path) -> None:
        """Point huggingface_hub's downloads (what timm's ``hf-hub:`` loader calls) here, with
        a fresh cache."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
