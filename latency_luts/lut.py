"""The LUT file: one latency entry per (op, input shape, output shape, batch, precision).

Format (JSON, versioned, readable by a person), version 3::

    {"format": "hant-lut", "version": 3,
     "target": {...Target fields: name, backend, device, precision, batch, threads, ...},
     "fingerprint": {"device": "Intel(R) Xeon(R) ...", "onnxruntime": "1.31.1", "threads": 1,
                     "precision": "fp32", "batch": 1, "driver": null, ...},
     "estimated": false,          # true if any entry is a roofline estimate
     "overhead_ms": 0.012,        # per-call cost of the backend, see below
     "entries": {"efn_3x3_e6_se1.00|40x28x28|40x28x28|b1|fp32":
                   {"op": ..., "in_shape": [...], "out_shape": [...], "batch": 1,
                    "precision": "fp32", "ms": 0.41, "spread_ms": 0.02, "runs": 300,
                    "estimated": false, "raw_ms": 0.422}}}

``ms`` is the op's latency net of ``overhead_ms``, the fixed cost of one backend call (for
onnxruntime: binding the input, allocating the output, the Python call; measured once on a
1-element identity graph). Each op measured alone pays it once, a whole network pays it once
too, so a network's latency is ``overhead_ms + sum(ms of its ops)``; ``raw_ms`` is what was
timed. ``spread_ms`` is p90 - p10 of the timed runs; estimates have ``runs`` 0.
Version 1 files (no ``overhead_ms``, ``estimated``) are read with ``overhead_ms`` 0.

Version 3 adds an optional ``"calibration"``: ``{"scale": s, "offset_ms": a, "archs": n, ...}``,
fitted on n whole networks measured end to end on the same machine (``hant lut calibrate``), so
that a network's latency is predicted as ``a + s * (overhead_ms + sum(ms of its ops))``
(`LUT.network_ms`). Ops timed one at a time do not add up to the network exactly (caches, the
runtime's work per call); the fit takes out what is common to all ops. Version 1 and 2 files are
read as uncalibrated and written back as version 3.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import LutError
from .files import atomic_write
from .target import Target

__all__ = ["LUT", "FORMAT", "VERSION", "entry_key"]

FORMAT = "hant-lut"
VERSION = 3
_READABLE = (1, 2, 3)


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in s)


def entry_key(op: str, in_shape, out_shape, batch: int, precision: str) -> str:
    """The key of one entry: ``op|CxHxW|CxHxW|bN|precision``."""
    return f"{op}|{_shape(in_shape)}|{_shape(out_shape)}|b{batch}|{precision}"


@dataclass
class LUT:
    """Latencies measured (or estimated) for one target.

    Example:
        >>> import latency_luts
        >>> lut = latency_luts.LUT(latency_luts.get_target("cpu"))
        >>> lut.set("identity", (8, 4, 4), (8, 4, 4), 0.5)
        >>> lut.get("identity", (8, 4, 4), (8, 4, 4)), ("identity", (8, 4, 4), (8, 4, 4)) in lut
        (0.5, True)
    """

    target: Target
    fingerprint: dict = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)
    overhead_ms: float | None = None
    calibration: dict | None = None

    def key(self, op: str, in_shape, out_shape) -> str:
        return entry_key(op, in_shape, out_shape, self.target.batch, self.target.precision)

    def get(self, op: str, in_shape, out_shape) -> float | None:
        e = self.entries.get(self.key(op, in_shape, out_shape))
        return None if e is None else float(e["ms"])

    def __contains__(self, item) -> bool:
        op, in_shape, out_shape = item
        return self.key(op, in_shape, out_shape) in self.entries

    def set(self, op: str, in_shape, out_shape, ms: float, spread_ms: float = 0.0,
            runs: int = 0, estimated: bool = False, **extra) -> None:
        """Add or replace an entry; `extra` fields (e.g. ``raw_ms``) are stored with it."""
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
            **extra,
        }

    @property
    def estimated(self) -> bool:
        """True if any entry is a roofline estimate rather than a measurement."""
        return any(e.get("estimated") for e in self.entries.values())

    def network_ms(self, sum_ms: float) -> float:
        """A whole network's predicted latency from the sum of its entries (overhead
        included): calibrated where the table has a calibration, else the sum itself."""
        c = self.calibration
        return sum_ms if not c else c["offset_ms"] + c["scale"] * sum_ms

    def ops_named(self, op: str) -> list[dict]:
        """The entries of op `op` (at any shape)."""
        return [e for e in self.entries.values() if e["op"] == op]

    def check_compatible(self, target: Target, source: str = "the LUT") -> None:
        """Refuse a LUT measured at another precision, batch or device than `target` asks.

        Raises:
            LutError: naming both settings and how to build a matching LUT.
        """
        mine, theirs = self.target, target
        diffs = [
            f"{k} {getattr(mine, k)} (asked: {getattr(theirs, k)})"
            for k in ("precision", "batch", "device")
            if getattr(mine, k) != getattr(theirs, k)
        ]
        if diffs:
            raise LutError(
                f"{source} was measured for target '{mine.name}' at {', '.join(diffs)}; "
                f"build one for '{theirs.name}' with `hant lut build MODEL --target "
                f"{theirs.name} -o FILE`"
            )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "target": self.target.to_dict(),
            "fingerprint": dict(self.fingerprint),
            "estimated": self.estimated,
            "overhead_ms": float(self.overhead_ms or 0.0),
            **({"calibration": dict(self.calibration)} if self.calibration else {}),
            "entries": dict(sorted(self.entries.items())),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> LUT:
        """Read a LUT dict, checking format, version and every entry.

        Raises:
            LutError: not a LUT, an unreadable version, or a damaged entry.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise LutError(
                f"{source} is not a HANT latency table (no \"format\": \"{FORMAT}\"); "
                "build one with `hant lut build MODEL --target NAME -o FILE`"
            )
        if d.get("version") not in _READABLE:
            raise LutError(
                f"{source} has LUT format version {d.get('version')}, this tool reads versions "
                f"{', '.join(map(str, _READABLE))}; rebuild it with `hant lut build`"
            )
        try:
            target = Target.from_dict(d["target"])
            entries = d["entries"]
            for k, e in entries.items():
                float(e["ms"])
                if not isinstance(e["op"], str):
                    raise TypeError(f"entry {k}: op is not a string")
                if e.get("precision", target.precision) != target.precision or e.get(
                        "batch", target.batch) != target.batch:
                    raise ValueError(f"entry {k} is at another precision or batch than the "
                                     f"table's target ({target.precision}, b{target.batch})")
            overhead = float(d.get("overhead_ms", 0.0))
            calibration = d.get("calibration")
            if calibration is not None:
                calibration = dict(calibration)
                if not float(calibration["scale"]) > 0:
                    raise ValueError("calibration scale is not positive")
                float(calibration["offset_ms"])
        except (KeyError, TypeError, ValueError) as e:
            raise LutError(
                f"{source} is a damaged LUT file ({e}); rebuild it with `hant lut build`"
            ) from e
        return cls(target=target, fingerprint=dict(d.get("fingerprint", {})), entries=entries,
                   overhead_ms=overhead, calibration=calibration)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): an interrupted save leaves the old file intact."""
        text = json.dumps(self.to_dict(), indent=1)
        return atomic_write(path, lambda p: p.write_text(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LUT:
        """Read a LUT file.

        Raises:
            LutError: unreadable, corrupt JSON, or see `from_dict`.
        """
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
