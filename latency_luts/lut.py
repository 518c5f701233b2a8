"""The LUT file: one latency entry per (op, input shape, output shape, batch, precision).

Format (JSON, versioned, readable by a person)::

    {"format": "hant-lut", "version": 1,
     "target": {...Target fields...},
     "fingerprint": {"cpu": ..., "onnxruntime": ..., "threads": 1, ...},
     "entries": {"efn_3x3_e6_se1.00|40x28x28|40x28x28|b1|fp32":
                   {"op": ..., "in_shape": [...], "out_shape": [...], "batch": 1,
                    "precision": "fp32", "ms": 0.41, "spread_ms": 0.02, "runs": 300,
                    "estimated": false}}}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import LutError
from .target import Target

__all__ = ["LUT", "FORMAT", "VERSION", "entry_key"]

FORMAT = "hant-lut"
VERSION = 1


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in s)


def entry_key(op: str, in_shape, out_shape, batch: int, precision: str) -> str:
    return f"{op}|{_shape(in_shape)}|{_shape(out_shape)}|b{batch}|{precision}"


@dataclass
class LUT:
    """Latencies measured (or estimated) for one target."""

    target: Target
    fingerprint: dict = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)

    def key(self, op: str, in_shape, out_shape) -> str:
        return entry_key(op, in_shape, out_shape, self.target.batch, self.target.precision)

    def get(self, op: str, in_shape, out_shape) -> float | None:
        e = self.entries.get(self.key(op, in_shape, out_shape))
        return None if e is None else float(e["ms"])

    def __contains__(self, item) -> bool:
        op, in_shape, out_shape = item
        return self.key(op, in_shape, out_shape) in self.entries

    def set(self, op: str, in_shape, out_shape, ms: float, spread_ms: float = 0.0,
            runs: int = 0, estimated: bool = False) -> None:
        self.entries[self.key(op, in_shape, out_shape)] = {
            "op": op,
            "in_shape": [int(v) for v in in_shape],
            "out_shape": [int(v) for v in out_shape],
            "batch": self.target.batch,
            "precision": self.target.precision,
            "ms": float(ms),
            "spread_ms": float(spread_ms),
            "runs": int(runs),
            "estimated": bool(estimated),
        }

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "target": self.target.to_dict(),
            "fingerprint": dict(self.fingerprint),
            "entries": dict(sorted(self.entries.items())),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> LUT:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise LutError(
                f"{source} is not a HANT latency table (no \"format\": \"{FORMAT}\"); "
                "build one with `hant lut build MODEL --target NAME -o FILE`"
            )
        if d.get("version") != VERSION:
            raise LutError(
                f"{source} has LUT format version {d.get('version')}, this tool reads version "
                f"{VERSION}; rebuild it with `hant lut build`"
            )
        try:
            target = Target.from_dict(d["target"])
            entries = d["entries"]
            for k, e in entries.items():
                float(e["ms"])
                if not isinstance(e["op"], str):
                    raise TypeError(f"entry {k}: op is not a string")
        except (KeyError, TypeError, ValueError) as e:
            raise LutError(
                f"{source} is a damaged LUT file ({e}); rebuild it with `hant lut build`"
            ) from e
        return cls(target=target, fingerprint=dict(d.get("fingerprint", {})), entries=entries)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): an interrupted save leaves the old file intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LUT:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise LutError(f"cannot read LUT file {path}: {e.strerror}") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise LutError(
                f"LUT file {path} is corrupt (invalid JSON at line {e.lineno}); delete it and "
                "rebuild with `hant lut build`"
            ) from e
        return cls.from_dict(d, source=str(path))
