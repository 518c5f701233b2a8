"""The plots a reader decides on, drawn from a report (and embedded in the model card).

* `front.png`: held-out top-1 (agreement with the teacher where the images have no labels)
  against end-to-end latency on the target: the teacher, the student written, the
  block-dropping baseline when the report has one, and every requested budget as a line.
  Latencies are the measured ones when the target's hardware was here, else the LUT's
  predictions (the axis says which). Only the written student is finetuned and evaluated: the
  other budgets of ``--speedup A,B`` are searched (their search-part loss is in `front.md` and
  `search_front.png`), so they are drawn as budgets, not as points.
* `layers.png`: per layer, the LUT's latency of the teacher's layer and of the chosen op.
"""

from __future__ import annotations

import io
from pathlib import Path

from ._text import format_value
from .store import atomic_write

__all__ = ["write_plots", "front_data"]


def _latency(entry: dict, kind: str):
    return (entry.get("latency_ms") or {}).get(kind)


def front_data(report: dict) -> dict:
    """What `front.png` draws: {'metric', 'latency': 'measured' | 'predicted', 'points':
    [{'label', 'latency_ms', 'value'}], 'budgets': [{'speedup', 'latency_ms'}]}.

    Example:
        >>> r = {"teacher": {"top1": 75.0, "latency_ms": {"predicted": 10.0, "measured": 12.0}},
        ...      "student": {"top1": 70.0, "agreement": 80.0,
        ...                  "latency_ms": {"predicted": 5.0, "measured": 6.0}},
        ...      "speedup": {"requested": 0.5}}
        >>> d = front_data(r)
        >>> d["latency"], [p["value"] for p in d["points"]], d["budgets"][0]["latency_ms"]
        ('measured', [75.0, 70.0], 6.0)
    """
    t, s = report["teacher"], report["student"]
    kind = "measured" if _latency(t, "measured") and _latency(s, "measured") else "predicted"
    metric = "top1" if s.get("top1") is not None else "agreement"
    entries = [("teacher", t | {"agreement": 100.0}), ("student", s)]
    if report.get("baseline"):
        entries.append(("baseline (blocks dropped)", report["baseline"]))
    points = [{"label": name, "latency_ms": _latency(e, kind), "value": e.get(metric)}
              for name, e in entries]
    front = report.get("front") or {}
    speedups = ([p["speedup_requested"] for p in front.get("points", [])]
                or [report["speedup"]["requested"]])
    t_ms = _latency(t, kind)
    budgets = [{"speedup": sp, "latency_ms": sp * t_ms} for sp in speedups if t_ms]
    return {"metric": metric, "latency": kind, "points": points, "budgets": budgets}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_STYLE = {"teacher": dict(marker="*", s=180, color="tab:red"),
          "student": dict(marker="o", s=70, color="tab:blue")}


def _front_png(report: dict) -> bytes:
    d = front_data(report)
    t_ms = d["points"][0]["latency_ms"]
    fig, ax = _figure(6, 4.2)
    for b in d["budgets"]:
        ax.axvline(b["latency_ms"], ls="--", color="gray", alpha=0.6)
        ax.annotate(f"budget {b['speedup']}x", (b["latency_ms"], 0),
                    xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=7, color="gray", rotation=90)
    for p in d["points"]:
        if p["latency_ms"] is None or p["value"] is None:
            continue
        style = _STYLE.get(p["label"], dict(marker="s", s=60, color="tab:green"))
        ax.scatter([p["latency_ms"]], [p["value"]], zorder=3, label=p["label"], **style)
        if t_ms and p["label"] != "teacher":
            ax.annotate(f"{p['latency_ms'] / t_ms:.2f}x", (p["latency_ms"], p["value"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
    metric = "top-1 (%)" if d["metric"] == "top1" else "top-1 agreement with the teacher (%)"
    ax.set_ylabel(f"{metric}, {report.get('eval_images', '?')} held-out images")
    where = report.get("target", {}).get("name", "?")
    ax.set_xlabel(f"latency on {where} (ms, "
                  f"{'measured end to end' if d['latency'] == 'measured' else 'LUT-predicted'})")
    ax.set_title(f"{report.get('teacher_name', 'teacher')}: accuracy vs latency")
    if len(d["budgets"]) > 1:
        ax.text(0.01, 0.01, "only the written student is finetuned and evaluated; the other "
                "budgets are searched (front.md)", transform=ax.transAxes, fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _layers_png(report: dict) -> bytes:
    lat = report["layer_latency_ms"]
    names = report.get("layers") or [str(i) for i in range(len(lat["teacher"]))]
    ops = report["student"]["choices"]
    n = len(names)
    fig, ax = _figure(7, 1.2 + 0.32 * n)
    ys = range(n)
    ax.barh([y - 0.2 for y in ys], lat["teacher"], height=0.4, color="tab:red", alpha=0.7,
            label="teacher layer")
    ax.barh([y + 0.2 for y in ys], lat["student"], height=0.4, color="tab:blue",
            label="chosen op")
    ax.set_yticks(list(ys), [f"{name}  {op}" for name, op in zip(names, ops)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("LUT latency (ms)")
    t_sum, s_sum = sum(lat["teacher"]), sum(lat["student"])
    ax.set_title(f"per-layer latency on {report.get('target', {}).get('name', '?')}: layers "
                 f"{format_value(t_sum)} -> {format_value(s_sum)} ms (stem + head "
                 f"{format_value(lat['stem'] + lat['head'])} ms)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def write_plots(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write `front.png` and, when the report has per-layer latencies, `layers.png` (atomic).

    Returns:
        {"front": path, "layers": path} for the files written.
    """
    out_dir = Path(out_dir)
    out = {"front": (out_dir / "front.png", _front_png)}
    if report.get("layer_latency_ms"):
        out["layers"] = (out_dir / "layers.png", _layers_png)
    paths = {}
    for key, (path, draw) in out.items():
        data = draw(report)
        paths[key] = atomic_write(path, lambda p, data=data: p.write_bytes(data))
    return paths
