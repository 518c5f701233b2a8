"""Reading a run's report: the headline figures as a dict (``compress --json``,
``hant report --json``) and as text (``compress``, ``hant report``)."""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

from ._errors import CompressorError
from ._text import format_value as f

__all__ = ["read_report", "summary", "headline", "format_report"]


def read_report(folder: str | Path) -> dict:
    """The ``report.json`` of a written folder (CompressorError, one line, if absent/corrupt)."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise CompressorError(f"{folder} has no report.json; is it a folder written by compress?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompressorError(f"{path} is corrupt: {e}") from e


def summary(report: dict, folder: str | Path | None = None) -> dict:
    """The headline figures of `report`, JSON-ready (what scripts chain on).

    Example:
        >>> s = summary(read_report("runs/lite0"), "runs/lite0")  # doctest: +SKIP
        >>> s["speedup"]["measured"], s["top1"]["student"]  # doctest: +SKIP
    """
    t, s, sp = report["teacher"], report["student"], report["speedup"]
    front = (report.get("front") or {}).get("points") or []
    return {
        "output": str(folder) if folder is not None else None,
        "teacher": report.get("teacher_name"),
        "target": report["target"]["name"],
        "latency_estimated": bool(report["target"].get("estimated")),
        "speedup": {k: sp.get(k) for k in ("requested", "predicted", "measured")},
        "latency_ms": {"teacher": t["latency_ms"], "student": s["latency_ms"]},
        "top1": {"teacher": t.get("top1"), "student": s.get("top1")},
        "agreement": s.get("agreement"),
        "eval_images": report.get("eval_images"),
        "complexity": report.get("complexity"),
        "choices": s["choices"],
        "front": [{k: p.get(k) for k in ("speedup_requested", "latency_ms", "loss")}
                  for p in front],
        "notes": report.get("notes", []),
    }


def headline(report: dict) -> str:
    """Three lines: teacher, student, speedup (what ``compress`` prints)."""
    t, s, sp = report["teacher"], report["student"], report["speedup"]
    return "\n".join([
        f"teacher  top1 {f(t['top1'], '.1f')}%  latency predicted "
        f"{f(t['latency_ms']['predicted'])} ms, measured {f(t['latency_ms']['measured'])} ms",
        f"student  top1 {f(s['top1'], '.1f')}%  agreement {f(s.get('agreement'), '.1f')}%  "
        f"latency predicted {f(s['latency_ms']['predicted'])} ms, measured "
        f"{f(s['latency_ms']['measured'])} ms",
        f"speedup  requested {sp['requested']}  predicted {f(sp['predicted'])}  measured "
        f"{f(sp.get('measured'))}   (on {report['eval_images']} held-out images)",
    ])


def _stage_lines(report: dict) -> list[str]:
    names = report.get("layers") or [str(i) for i in range(len(report["student"]["choices"]))]
    out = []
    pairs = zip(names, report["student"]["choices"])
    for stage, group in groupby(pairs, key=lambda p: p[0].rsplit(".", 1)[0]):
        ops = [op for _, op in group]
        counted = [op + (f" x{n}" if (n := len(list(g))) > 1 else "") for op, g in groupby(ops)]
        out.append(f"  {stage:14s} " + ", ".join(counted))
    return out


def format_report(report: dict) -> str:
    """A readable summary: target, headline figures, size, chosen ops per stage, the search
    front of a multi-budget run, phase times and the run's notes."""
    tg = report["target"]
    est = "; latencies estimated" if tg.get("estimated") else ""
    lines = [f"{report.get('teacher_name', '?')} on target {tg['name']} "
             f"({tg.get('backend', '?')}, {tg.get('device', '?')}, {tg.get('precision', '?')}, "
             f"batch {tg.get('batch', '?')}{est})", headline(report)]
    cx = report.get("complexity")
    if cx:
        t, s = cx["teacher"], cx["student"]
        lines.append(f"size     params {f(t['params_m'])} -> {f(s['params_m'])} M  GMACs "
                     f"{f(t['gmacs'])} -> {f(s['gmacs'])}  activations "
                     f"{f(t['activations_m'])} -> {f(s['activations_m'])} M")
    lines += ["chosen ops per stage:", *_stage_lines(report)]
    front = (report.get("front") or {}).get("points") or []
    if front:
        lines.append("search front (LUT-predicted latency, search-part loss before finetuning):")
        for p in front:
            lines.append(f"  {p['speedup_requested']:<6} {f(p.get('latency_ms'))} ms  loss "
                         f"{f(p.get('loss'), '.4g')}" + (f"  ({p['error']})" if p.get("error")
                                                         else ""))
    phases = report.get("phases", {})
    if phases:
        lines.append("phases: " + ", ".join(f"{k} {v.get('seconds', 0):.1f} s"
                                            for k, v in phases.items()))
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
