"""The work dir: one artifact per phase, keyed by what it depends on, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from latency_luts.files import atomic_write

from ._errors import ArtifactError

__all__ = ["Store", "atomic_write", "cached", "digest", "tensor_digest", "default_work_dir"]

T = TypeVar("T")


def default_work_dir() -> Path:
    """``$HANT_HOME`` or ``~/.cache/hant``: shared by runs so artifacts are reused."""
    return Path(os.environ.get("HANT_HOME", Path.home() / ".cache" / "hant"))


def digest(*parts, n: int = 16) -> str:
    """A short stable hash of JSON-serialisable parts."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]], n: int = 16) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:n]


class Store:
    """Paths, JSON and tensor files under one work-dir root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def write_json(self, path: Path, obj) -> Path:
        return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=str)))

    def read_json(self, path: Path):
        try:
            return json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(
                f"work-dir artifact {path} is corrupt ({e}); delete it and run again"
            ) from e

    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> Path:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return atomic_write(path, lambda p: save_file(tensors, str(p)))

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(
                f"work-dir artifact {path} is unreadable ({e}); delete it and run again"
            ) from e


def cached(path: Path, compute: Callable[[], T], save: Callable[[T, Path], object],
           load: Callable[[Path], T]) -> tuple[T, bool]:
    """The artifact at `path` (a file named by a key of everything it depends on): loaded when
    there, else computed and saved (atomically, by `save`). Returns (artifact, was cached)."""
    if Path(path).exists():
        return load(path), True
    value = compute()
    save(value, path)
    return value, False
