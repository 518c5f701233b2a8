"""Write a compressed model out (safetensors, config.json, model card, ONNX, report) and load
it back; upload a written folder to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models import save_for_hf
from torch import nn

import ops_pool

from ._errors import ModelError
from ._text import format_value
from .model import ARCHITECTURE, student_pretrained_cfg
from .split import split

__all__ = ["save_pretrained", "load", "push_to_hub", "model_card", "export_onnx"]

_logger = logging.getLogger(__name__)


def export_onnx(model: nn.Module, input_size, path: Path) -> Path:
    """`model` in its inference form (multi-branch ops fused, eval mode) as ONNX at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = ops_pool.reparameterize(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, *input_size),), str(path), dynamo=False,
            input_names=["pixel_values"], output_names=["logits"], opset_version=17,
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def model_card(report: dict, repo_name: str = "") -> str:
    """A README.md: what was compressed, how, and what was measured (figures from the report)."""
    t, s, sp = report["teacher"], report["student"], report["speedup"]
    teacher = report.get("teacher_name", "teacher")
    lines = [
        "---",
        "library_name: timm",
        "license: apache-2.0",
        "tags: [image-classification, timm, hant, compression]",
        "---",
        f"# {repo_name or teacher + ' (HANT-compressed)'}",
        "",
        f"`{teacher}` compressed with hardware-aware network transformation (HANT) for target "
        f"`{report['target']['name']}` ({report['target'].get('description', '')}).",
        "",
        "## Load",
        "```python",
        "import timm, compressor  # importing compressor registers the architecture",
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)',
        "```",
        "",
        "## Measured",
        "| | teacher | student |",
        "| --- | --- | --- |",
        f"| latency, LUT-predicted (ms) | {format_value(t['latency_ms']['predicted'])} | "
        f"{format_value(s['latency_ms']['predicted'])} |",
        f"| latency, measured end to end (ms) | {format_value(t['latency_ms']['measured'])} | "
        f"{format_value(s['latency_ms']['measured'])} |",
        f"| top-1 (%) on {report['eval_images']} held-out images | {format_value(t['top1'])} | "
        f"{format_value(s['top1'])} |",
        f"| top-1 agreement with the teacher (%) | 100 | {format_value(s.get('agreement'))} |",
        "",
        f"Speedup (student / teacher latency; 0.5 = twice as fast): requested "
        f"{format_value(sp['requested'])}, predicted {format_value(sp['predicted'])}, measured "
        f"{format_value(sp['measured'])}.",
        "",
        "The held-out images were never used for distillation, search or finetuning. "
        "A small calibration set gives a noisy accuracy: read it with its image count.",
        "",
        "## Chosen operations",
        "| layer | op |",
        "| --- | --- |",
    ]
    for name, op in zip(report.get("layers", []), s["choices"]):
        lines.append(f"| {name} | `{op}` |")
    lines += ["", "Made with the `hant-compressor` tool; the full record is `report.json`.", ""]
    return "\n".join(lines)


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    teacher_name: str,
    teacher_args: dict,
    choices: list[str],
    input_size,
    report: dict,
    onnx: bool = True,
) -> Path:
    """Write the folder atomically: built beside `out_dir`, then renamed into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        teacher_cfg = getattr(model, "pretrained_cfg", None) or {}
        model.pretrained_cfg = student_pretrained_cfg(teacher_cfg)
        model_args = {
            "teacher": teacher_name,
            "choices": list(choices),
            "teacher_args": dict(teacher_args),
            "input_size": list(input_size),
            "channel_divisor": getattr(model, "channel_divisor", ops_pool.get_channel_divisor()),
        }
        save_for_hf(model, str(tmp), model_args=model_args, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(report))
        if onnx:
            export_onnx(model, input_size, tmp / "onnx" / "model.onnx")
        if report.get("front"):
            from .front import write_front

            write_front(report["front"]["points"], report["front"]["teacher"], tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        _readable(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _readable(folder: Path) -> None:
    """Files 0644 and folders 0755, like every artifact (timm's save_for_hf writes
    model.safetensors 0600, which a shared model folder should not be)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def load(
    path: str | os.PathLike, teacher: nn.Module | None = None, fuse: bool = True
) -> nn.Module:
    """Load a folder written by `save_pretrained` (eval mode).

    Args:
        path: the output folder.
        teacher: only for models compressed from a module timm does not know: the same
            architecture (its weights are not used).
        fuse: return the inference form: multi-branch ops (``repvgg_*``) fused into single
            convs (`ops_pool.reparameterize`; same outputs within 1e-4, faster). Pass False to
            keep the trainable multi-branch form, e.g. to finetune further; its state dict is
            the one saved.
    """
    model = _load(Path(path), teacher)
    if fuse:
        model = ops_pool.reparameterize(model, inplace=True)
    return model.eval()


def _load(path: Path, teacher: nn.Module | None) -> nn.Module:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json; is it a folder written by `compress`?")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("architecture") != ARCHITECTURE:
        raise ModelError(f"{path} holds a '{cfg.get('architecture')}', not a HANT model")
    args = cfg.get("model_args", {})
    if teacher is None:
        import timm

        return timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    s = split(teacher.eval(), input_size=args.get("input_size"))
    with ops_pool.channel_divisor(args.get("channel_divisor", ops_pool.CHANNEL_DIVISOR)):
        model = s.assemble(args["choices"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Add HANT-compressed model",
    api=None,
) -> str:
    """Upload a folder written by `save_pretrained` to the Hub; returns the commit URL.

    `api` defaults to ``huggingface_hub.HfApi(token=token)`` (endpoint from ``HF_ENDPOINT``).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a saved model folder (no config.json)")
    api = api or HfApi(token=token, library_name="hant-compressor")
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
