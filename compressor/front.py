"""The search's latency / loss front of a multi-budget run (`--speedup 0.25,0.5,0.75`).

Each point is the architecture the search picked for one budget, with its LUT-predicted latency
and its loss (KL to the teacher) on the search part's images with its distilled weights, before
any finetuning: what the search saw, not held-out accuracy (that is `front.png`, drawn by
`compressor.plots` from the report). `write_front` writes, atomically, into the output folder:

* `search_front.png`: latency vs search loss, one point per requested speedup, the
  Pareto-optimal ones joined, the teacher marked;
* `front.csv` and `front.md`: the same as a table.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ._text import format_value
from .store import atomic_write

__all__ = ["write_front", "pareto_mask"]

_COLUMNS = ("speedup_requested", "latency_ms", "speedup", "loss", "pareto", "choices")


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """For each (latency, loss) point: is no other point at least as good in both and better in one?

    Points with a missing (None or nan) value are never on the front.
    """
    def ok(p):
        return all(v is not None and not math.isnan(v) for v in p)

    out = []
    for p in points:
        if not ok(p):
            out.append(False)
            continue
        out.append(not any(ok(q) and q[0] <= p[0] and q[1] <= p[1] and q != p for q in points))
    return out


def _rows(points: list[dict], teacher: dict) -> list[dict]:
    t_ms = teacher.get("latency_ms")
    xy = [(p.get("latency_ms"), p.get("loss")) for p in points]
    mask = pareto_mask([(math.nan if x is None else x, math.nan if y is None else y)
                        for x, y in xy])
    rows = []
    for p, on in zip(points, mask):
        lat = p.get("latency_ms")
        choices = p.get("choices") or []
        rows.append({
            "speedup_requested": p.get("speedup_requested"),
            "latency_ms": lat,
            "speedup": lat / t_ms if lat is not None and t_ms else None,
            "loss": p.get("loss"),
            "pareto": on,
            "choices": ";".join(choices) if not isinstance(choices, str) else choices,
        })
    rows.sort(key=lambda r: (math.inf if r["latency_ms"] is None else r["latency_ms"]))
    return rows


def _fmt(v) -> str:
    return format_value(v, ".6g", missing="")


def _csv(rows: list[dict], teacher: dict) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_COLUMNS)
    w.writerow(["teacher", _fmt(teacher.get("latency_ms")), "1", _fmt(teacher.get("loss")), "",
                "teacher"])
    for r in rows:
        w.writerow([_fmt(r[c]) for c in _COLUMNS])
    return buf.getvalue().encode()


def _markdown(rows: list[dict], teacher: dict) -> bytes:
    lines = ["| speedup requested | predicted latency (ms) | speedup | search-part loss, before "
             "finetuning | Pareto |",
             "| --- | --- | --- | --- | --- |",
             f"| teacher | {_fmt(teacher.get('latency_ms'))} | 1 | {_fmt(teacher.get('loss'))} | |"]
    for r in rows:
        lines.append(f"| {_fmt(r['speedup_requested'])} | {_fmt(r['latency_ms'])} | "
                     f"{_fmt(r['speedup'])} | {_fmt(r['loss'])} | {'yes' if r['pareto'] else ''} |")
    return ("\n".join(lines) + "\n").encode()


def _png(rows: list[dict], teacher: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=120)
    ax = fig.add_subplot()
    pts = [r for r in rows if r["latency_ms"] is not None and r["loss"] is not None]
    front = [r for r in pts if r["pareto"]]
    ax.plot([r["latency_ms"] for r in front], [r["loss"] for r in front], "-", color="tab:blue",
            alpha=0.5, label="Pareto front")
    ax.scatter([r["latency_ms"] for r in pts], [r["loss"] for r in pts], color="tab:blue",
               zorder=3, label="students")
    for r in pts:
        ax.annotate(f"{_fmt(r['speedup_requested'])}x", (r["latency_ms"], r["loss"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    if teacher.get("latency_ms") is not None and teacher.get("loss") is not None:
        ax.scatter([teacher["latency_ms"]], [teacher["loss"]], marker="*", s=160,
                   color="tab:red", zorder=4, label="teacher")
    ax.set_xlabel("latency (ms, LUT-predicted)")
    ax.set_ylabel("search-part loss, before finetuning")
    ax.set_title("search front: latency vs loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_front(points: list[dict], teacher: dict, out_dir: Path) -> dict[str, Path]:
    """Write the front of a multi-budget search as `search_front.png`, `front.csv` and
    `front.md`.

    Args:
        points: one dict per requested speedup with keys `speedup_requested`, `latency_ms`,
            `loss` and `choices` (op names; a value may be None for a budget that failed).
        teacher: `latency_ms` and `loss` of the teacher (marked on the plot, first table row).
        out_dir: the output folder (created if missing).

    Returns:
        {"png": path, "csv": path, "md": path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _rows(points, teacher)
    paths = {"png": out_dir / "search_front.png", "csv": out_dir / "front.csv",
             "md": out_dir / "front.md"}
    for key, data in (("csv", _csv(rows, teacher)), ("md", _markdown(rows, teacher)),
                      ("png", _png(rows, teacher))):
        atomic_write(paths[key], lambda p, data=data: p.write_bytes(data))
    return paths
