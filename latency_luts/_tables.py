"""LUTs shipped with the package (``latency_luts/tables/MODEL-TARGET.json``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["list_tables", "shipped_table"]


def _root() -> Path:
    return Path(str(resources.files("latency_luts").joinpath("tables")))


def list_tables() -> list[Path]:
    """Paths of the shipped LUT files, sorted.

    Example:
        >>> import latency_luts
        >>> all(p.suffix == ".json" for p in latency_luts.list_tables())
        True
    """
    root = _root()
    return sorted(root.glob("*.json")) if root.is_dir() else []


def shipped_table(model: str, target: str) -> Path | None:
    """The shipped LUT of `model` on `target`, if there is one (measured on the machine its
    fingerprint names: use it as a reference, or where that machine is the target)."""
    path = _root() / f"{model}-{target}.json"
    return path if path.is_file() else None
