"""The work dir: one artifact per phase, keyed by what it depends on, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latency_luts.files import atomic_write

from ._errors import ArtifactError

__all__ = ["Store", "atomic_write", "cached", "digest", "tensor_digest", "default_work_dir",
           "artifact_lock", "discard", "seal", "unseal", "check_seal"]

T = TypeVar("T")
_logger = logging.getLogger(__name__)
_CHECKSUM = "hant_sha256"  # in a JSON object's keys and a safetensors file's metadata


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
    """Paths, JSON and tensor files under one work-dir root. Every JSON object and tensor file
    it writes carries a checksum of its content, checked when read: a truncated or bit-flipped
    artifact raises ArtifactError instead of loading wrong values (files written before the
    checksums were added load unchecked)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def write_json(self, path: Path, obj) -> Path:
        if isinstance(obj, dict):
            obj = {**obj, _CHECKSUM: _json_digest(obj)}
        return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=str)))

    def read_json(self, path: Path):
        try:
            obj = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"work-dir artifact {path} is corrupt ({e}); delete it and run again"
            ) from e
        if isinstance(obj, dict) and _CHECKSUM in obj:
            want = obj.pop(_CHECKSUM)
            if want != _json_digest(obj):
                raise ArtifactError(f"work-dir artifact {path} is corrupt (checksum mismatch); "
                                    "delete it and run again")
        return obj

    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> Path:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {_CHECKSUM: tensor_digest(sorted(tensors.items()), n=64)}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(path), framework="pt") as f:
                want = (f.metadata() or {}).get(_CHECKSUM)
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(
                f"work-dir artifact {path} is unreadable ({e}); delete it and run again"
            ) from e
        if want is not None and want != tensor_digest(sorted(tensors.items()), n=64):
            raise ArtifactError(f"work-dir artifact {path} is corrupt (checksum mismatch); "
                                "delete it and run again")
        return tensors


def _json_digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def artifact_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``PATH.lock`` (a `filelock.FileLock`): the one process that computes and writes
    the artifact at `path`; another run on the same work dir waits, then finds it written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock"))):
        yield


def seal(path: str | os.PathLike) -> None:
    """Write ``PATH.sha256`` beside a file another package writes (the work dir's LUT), for
    `check_seal`; `unseal` first when the file is about to change."""
    path = Path(path)
    digest_ = hashlib.sha256(path.read_bytes()).hexdigest()
    atomic_write(path.with_name(path.name + ".sha256"), lambda p: p.write_text(digest_))


def unseal(path: str | os.PathLike) -> None:
    Path(path).with_name(Path(path).name + ".sha256").unlink(missing_ok=True)


def check_seal(path: str | os.PathLike) -> None:
    """ArtifactError if `path` no longer matches its ``.sha256`` (none: not checked; a run
    killed while the file grew leaves none)."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if side.is_file() and side.read_text().strip() != hashlib.sha256(
            path.read_bytes()).hexdigest():
        raise ArtifactError(f"work-dir artifact {path} is corrupt (checksum mismatch); "
                            "delete it and run again")


def discard(path: str | os.PathLike, error: Exception) -> None:
    """Warn (one line) that the artifact at `path` is damaged, and delete it to recompute."""
    _logger.warning("%s; recomputing it", str(error).split("; delete it")[0])
    Path(path).unlink(missing_ok=True)


def cached(path: Path, compute: Callable[[], T], save: Callable[[T, Path], object],
           load: Callable[[Path], T]) -> tuple[T, bool]:
    """The artifact at `path` (a file named by a key of everything it depends on): loaded when
    there, else computed and saved (atomically, by `save`). Returns (artifact, was cached).

    The artifact's lock is held throughout, so two runs on one work dir compute it once; a
    damaged file (ArtifactError from `load`) is reported in one warning line and recomputed."""
    with artifact_lock(path):
        if Path(path).exists():
            try:
                return load(path), True
            except ArtifactError as e:
                discard(path, e)
        value = compute()
        save(value, path)
        return value, False
