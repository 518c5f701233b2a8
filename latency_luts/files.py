"""Atomic file writes, shared by LUT files and by compressor's work dir and outputs."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "full_disk_error"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename into place; an interruption leaves no half file.

    The file is readable by others (0644), like any ordinary artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as e:
        full = full_disk_error(e, path)  # before the temp file frees its space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full is not None:
            raise full from e
        raise
    return path


def full_disk_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """An ``OSError(ENOSPC)`` naming `path` when `e`, raised while writing it, is a full disk
    that the writer reported as its own error type (torch.save and safetensors do); else None.
    """
    if isinstance(e, OSError) or not isinstance(e, Exception):
        return None
    said = os.strerror(errno.ENOSPC) in str(e) or f"os error {errno.ENOSPC})" in str(e)
    try:
        st = os.statvfs(Path(path).parent)
        full = st.f_bavail * st.f_frsize < 64 << 10
    except OSError:
        full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if said or full else None
