"""The model card (README.md) of a written folder, in timm's shape, and the Hub commit message.

The YAML is built with ``huggingface_hub.ModelCardData`` (the fields timm's
``generate_readme`` writes: ``library_name``, ``pipeline_tag``, ``license``, ``tags``,
``datasets``; plus ``base_model`` and a ``model-index`` of the measured figures as
``EvalResult``s), so the Hub shows them; the body says what was done, how to load it, how it
was measured and what it was not measured on. Every figure comes from the report.
"""

from __future__ import annotations

import math
from itertools import groupby

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ._text import format_value as fv

__all__ = ["model_card", "card_data", "commit_message", "TASK"]

TASK = "image-classification"
TAGS = [TASK, "timm", "hant-compressor", "model-compression", "knowledge-distillation"]


def _model_name(report: dict, repo_id: str | None) -> str:
    if repo_id:
        return repo_id.split("/")[-1]
    sp = report["speedup"]["requested"]
    return f"{report.get('teacher_name', 'model')}-hant-{report['target']['name']}-{sp}"


def _latency_kind(report: dict) -> str:
    return "measured" if report["speedup"].get("measured") is not None else "predicted"


def _backend(target: dict) -> str:
    return (f"{target.get('backend', '?')}, {target.get('device', '?')}, "
            f"{target.get('precision', '?')}, batch {target.get('batch', '?')}")


def _eval_set(report: dict) -> dict:
    src = report.get("sources") or {}
    val = src.get("val_data")
    return {"dataset_type": "imagefolder",
            "dataset_name": val or src.get("data") or "images",
            "dataset_split": "validation (--val-data)" if val else "held-out"}


def _eval_results(report: dict) -> list[EvalResult]:
    """top-1 and agreement on the held-out images; latency and speedup on the target."""
    s, sp, t = report["student"], report["speedup"], report["target"]
    n = report.get("eval_images")
    task = {"task_type": TASK, "task_name": "Image Classification"}
    acc = task | _eval_set(report)
    out = []
    if s.get("top1") is not None:
        out.append(EvalResult(**acc, metric_type="accuracy", metric_value=s["top1"],
                              metric_name=f"top-1 accuracy (%), {n} images"))
    if s.get("agreement") is not None:
        out.append(EvalResult(**acc, metric_type="agreement", metric_value=s["agreement"],
                              metric_name=f"top-1 agreement with the teacher (%), {n} images"))
    kind = _latency_kind(report)
    how = "measured end to end" if kind == "measured" else "LUT-predicted, not measured"
    where = task | {"dataset_type": "hardware-target", "dataset_name": f"target {t['name']}",
                    "dataset_config": _backend(t)}
    args = {"target": t["name"], "backend": t.get("backend"), "device": t.get("device"),
            "precision": t.get("precision"), "batch": t.get("batch"),
            "speedup_requested": sp["requested"]}
    out.append(EvalResult(**where, metric_type="latency",
                          metric_value=round(s["latency_ms"][kind], 4),
                          metric_name=f"latency (ms), {how}", metric_config=t.get("backend"),
                          metric_args=args))
    out.append(EvalResult(**where, metric_type="speedup", metric_value=round(sp[kind], 4),
                          metric_name=f"latency / teacher latency, {how} (requested "
                                      f"{sp['requested']})",
                          metric_config=t.get("backend"), metric_args=args))
    return out


def card_data(report: dict, repo_id: str | None = None) -> ModelCardData:
    """The card's YAML metadata (what the Hub page shows beside the card)."""
    teacher = (report.get("sources") or {}).get("teacher") or {}
    return ModelCardData(
        library_name="timm", pipeline_tag=TASK, license=teacher.get("license") or "apache-2.0",
        tags=TAGS + [f"hant-target-{report['target']['name']}"],
        base_model=teacher.get("hub_id") or None, datasets=teacher.get("datasets") or None,
        model_name=_model_name(report, repo_id), eval_results=_eval_results(report))


def _stages(report: dict) -> list[str]:
    """One row per stage (a layer name's prefix): its layers' chosen ops."""
    names = report.get("layers") or []
    ops = report["student"]["choices"]
    rows = ["| stage | layers | chosen ops |", "| --- | --- | --- |"]
    pairs = zip(names, ops)
    for stage, group in groupby(pairs, key=lambda p: p[0].rsplit(".", 1)[0]):
        chosen = [op for _, op in group]
        counted = [f"`{op}`" + (f" x{n}" if (n := len(list(g))) > 1 else "")
                   for op, g in groupby(chosen)]
        rows.append(f"| `{stage}` | {len(chosen)} | {', '.join(counted)} |")
    return rows


def _figures(report: dict) -> list[str]:
    t, s = report["teacher"], report["student"]
    n = report.get("eval_images")
    rows = ["| | teacher | student |", "| --- | --- | --- |",
            f"| latency, measured end to end (ms) | {fv(t['latency_ms']['measured'])} | "
            f"{fv(s['latency_ms']['measured'])} |",
            f"| latency, LUT-predicted (ms) | {fv(t['latency_ms']['predicted'])} | "
            f"{fv(s['latency_ms']['predicted'])} |",
            f"| top-1 (%) on {n} held-out images | {fv(t['top1'], '.1f')} | "
            f"{fv(s['top1'], '.1f')} |",
            f"| top-1 agreement with the teacher (%) | 100 | {fv(s.get('agreement'), '.1f')} |"]
    cx = report.get("complexity")
    if cx:
        for key, label in (("params_m", "params (M)"), ("gmacs", "GMACs"),
                           ("activations_m", "activations (M)")):
            rows.append(f"| {label} | {fv(cx['teacher'][key])} | {fv(cx['student'][key])} |")
    return rows


def _load(repo_id: str | None) -> list[str]:
    hub = repo_id or "ORG/NAME"
    note = "" if repo_id else "  # once pushed (`compress ... --push-to-hub ORG/NAME`)"
    return ["```python", "import timm, compressor  # importing compressor registers the "
            "architecture", f'model = timm.create_model("hf-hub:{hub}", pretrained=True){note}',
            'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)  # a '
            "local copy", "", "from timm.data import create_transform, resolve_data_config",
            "transform = create_transform(**resolve_data_config({}, model=model))  # the "
            "teacher's preprocessing", "```", "",
            "`onnx/model.onnx` is the same network in its inference form (input `pixel_values`, "
            "N x C x H x W; output `logits`)."]


def _spread(report: dict) -> str:
    """Binomial standard error of the student's top-1 on the held-out images."""
    n, p = report.get("labelled_eval_images") or 0, report["student"].get("top1")
    if not n or p is None:
        return ""
    return f" (standard error about {math.sqrt(p * (100 - p) / n):.1f} points)"


def _measured(report: dict) -> list[str]:
    t = report["target"]
    n = report.get("eval_images")
    est = t.get("estimated") or report["speedup"].get("measured") is None
    lines = [
        f"- **Latency.** Every candidate op was timed at its layer's shapes on target "
        f"`{t['name']}` ({_backend(t)}): the look-up table whose sum is the predicted latency. "
        + ("The target's hardware was not on the machine that ran this, so those are roofline "
           "estimates and nothing was measured end to end." if est else
           "Teacher and student were then measured end to end with the same backend; the "
           "measured speedup is their ratio."),
        f"- **Accuracy.** Top-1 and top-1 agreement with the teacher on {n} images "
        f"({report.get('labelled_eval_images', n)} labelled) that distillation, search and "
        "finetuning never saw" + _spread(report) + ".",
    ]
    if report.get("complexity"):
        size = "x".join(map(str, report["complexity"]["input_size"]))
        lines.append(f"- **Size.** Params, GMACs (multiply-adds) and activations at one "
                     f"{size} image, counted with `torch.utils.flop_counter`; the student in "
                     "its inference form (multi-branch ops fused).")
    return lines


def _not_measured(report: dict) -> list[str]:
    t = report["target"]
    lines = [f"- Accuracy on a full benchmark (e.g. the ImageNet validation set): "
             f"{report.get('eval_images')} images give a noisy figure; read it with its count.",
             f"- Latency on hardware, precisions or batch sizes other than target `{t['name']}` "
             f"({_backend(t)}).",
             "- Robustness, calibration, out-of-distribution data or downstream tasks."]
    if (report.get("front") or {}).get("points"):
        lines.append("- The other budgets of this multi-budget run: searched (their "
                     "search-part loss is in `front.md`), not finetuned or evaluated.")
    return lines


def _body(report: dict, repo_id: str | None) -> list[str]:
    t, sp = report["target"], report["speedup"]
    teacher = report.get("teacher_name", "teacher")
    src = (report.get("sources") or {}).get("teacher") or {}
    base = f" (pretrained weights: `{src['hub_id']}`)" if src.get("hub_id") else ""
    lines = [
        f"# {_model_name(report, repo_id)}", "",
        f"`{teacher}`{base} compressed with hardware-aware network transformation (HANT) for "
        f"target `{t['name']}` ({t.get('description', '')}): slow layers replaced by distilled "
        "efficient ops, then the whole network finetuned with distillation from the teacher.",
        "",
        f"Speedup (student latency / teacher latency; 0.5 = twice as fast): requested "
        f"**{sp['requested']}**, predicted {fv(sp['predicted'])}, measured "
        f"**{fv(sp.get('measured'))}**.", "",
        "## How to load", "", *_load(repo_id), "",
        "## Results", "", "![top-1 against latency](front.png)", "", *_figures(report), "",
        "## Chosen operations", "", *_stages(report), "",
    ]
    if report.get("layer_latency_ms"):
        lines += ["![per-layer latency, teacher vs student](layers.png)", ""]
    lines += ["## How it was measured", "", *_measured(report), "",
              "## What it was not measured on", "", *_not_measured(report), ""]
    if report.get("notes"):
        lines += ["## Notes from the run", "", *[f"- {n}" for n in report["notes"]], ""]
    lines += ["Made with `hant-compressor`; the full record is `report.json`.", ""]
    return lines


def model_card(report: dict, repo_id: str | None = None) -> str:
    """README.md: YAML metadata (`card_data`) and the body, every figure from `report`.

    Args:
        report: the run's report (``Result.report``, ``report.json``).
        repo_id: ``ORG/NAME`` once it is known: the card's load line names it.
    """
    meta = card_data(report, repo_id).to_yaml()
    return str(ModelCard(f"---\n{meta}\n---\n" + "\n".join(_body(report, repo_id))))


def commit_message(report: dict) -> str:
    """One line with the headline figures, for the Hub commit.

    Example:
        >>> m = commit_message({"teacher_name": "lite0", "target": {"name": "cpu"},
        ...     "speedup": {"requested": 0.5, "predicted": 0.49, "measured": 0.47},
        ...     "teacher": {"top1": 75.0}, "student": {"top1": 70.4}, "eval_images": 50})
        >>> m.startswith("HANT lite0 for cpu: measured speedup 0.470 (requested 0.5), ")
        True
        >>> m.endswith("top-1 70.4% (teacher 75.0%) on 50 held-out images")
        True
    """
    sp = report["speedup"]
    kind = _latency_kind(report)
    t1, s1 = report["teacher"].get("top1"), report["student"].get("top1")
    acc = (f"top-1 {fv(s1, '.1f')}% (teacher {fv(t1, '.1f')}%)" if s1 is not None else
           f"agreement {fv(report['student'].get('agreement'), '.1f')}%")
    return (f"HANT {report.get('teacher_name', 'model')} for {report['target']['name']}: "
            f"{kind} speedup {fv(sp[kind])} (requested {sp['requested']}), {acc} on "
            f"{report.get('eval_images')} held-out images")
