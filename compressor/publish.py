"""Write a compressed model out (safetensors, config.json, model card, ONNX, report) and load
it back; upload a written folder to the Hugging Face Hub."""

from __future__ import annotations

import contextlib
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
from latency_luts.files import full_disk_error

from ._errors import ModelError
from .card import commit_message as headline
from .card import model_card
from .front import write_front
from .model import ARCHITECTURE, student_pretrained_cfg
from .plots import write_plots
from .split import split
from .store import atomic_write

__all__ = ["save_pretrained", "load", "push_to_hub", "check_repo_id", "model_card",
           "export_onnx"]

_logger = logging.getLogger(__name__)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call raises when the Hub refuses or cannot be reached (HfHubHTTPError is an
    OSError; newer huggingface_hub versions raise their HTTP client's errors for the rest)."""
    from huggingface_hub import errors

    return (OSError, getattr(errors, "HTTPError", OSError))


_HUB_ERRORS = _hub_errors()


def export_onnx(model: nn.Module, input_size, path: Path) -> Path:
    """`model` in its inference form (multi-branch ops fused, eval mode) as one ONNX file at
    `path` (input ``pixel_values`` with a dynamic batch, output ``logits``), checked with
    ``onnx.checker``.

    Exported with torch's current exporter (``dynamo=True``, torch.export and onnxscript);
    where that fails for an op, with the TorchScript-based one (deprecated), logged.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    model = ops_pool.reparameterize(model).cpu().eval()  # a fused copy
    x = torch.zeros(2, *input_size)  # batch 2: a batch of 1 could specialise the batch axis
    names = {"input_names": ["pixel_values"], "output_names": ["logits"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                              external_data=False, optimize=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        except Exception as e:  # torch.export raises many types for an untraceable op
            _logger.warning("the dynamo ONNX exporter failed (%s); exporting with the "
                            "TorchScript-based one", str(e).splitlines()[0] if str(e) else e)
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18,
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                              **names)
    onnx.checker.check_model(str(path), full_check=True)
    return path


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
    repo_id: str | None = None,
) -> Path:
    """Write the folder atomically: built beside `out_dir`, then renamed into place.

    It holds ``model.safetensors`` and ``config.json`` (timm's ``save_for_hf``), ``README.md``
    (the model card; `repo_id` names the Hub repo in its load line), ``front.png`` and
    ``layers.png`` (`compressor.plots`), ``onnx/model.onnx`` (unless not `onnx`),
    ``report.json``, and for a multi-budget run the search front (`compressor.front`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    _remove_stale(out_dir)
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
        if getattr(model, "layer_patterns", None) is not None:  # split with --layers
            model_args["layers"] = list(model.layer_patterns)
        save_for_hf(model, str(tmp), model_args=model_args, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(report, repo_id))
        if onnx:
            export_onnx(model, input_size, tmp / "onnx" / "model.onnx")
        if report.get("front"):
            write_front(report["front"]["points"], report["front"]["teacher"], tmp)
        write_plots(report, tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        _readable(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        full = full_disk_error(e, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise
    return out_dir


def _remove_stale(out_dir: Path) -> None:
    """The partial or old folders of `out_dir` that a killed run left (its process is gone)."""
    for p in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if kind.endswith((".partial", ".old")) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    s = split(teacher.eval(), input_size=args.get("input_size"), layers=args.get("layers"))
    with ops_pool.channel_divisor(args.get("channel_divisor", ops_pool.CHANNEL_DIVISOR)):
        model = s.assemble(args["choices"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api=None,
) -> str:
    """Upload a folder written by `save_pretrained` to the Hub with
    ``huggingface_hub.upload_folder``; returns the commit URL.

    The folder's model card is first rewritten to name `repo_id` in its load line (so the
    folder and the Hub page match), and the commit message carries the headline figures of its
    ``report.json`` unless `commit_message` is given.

    Args:
        folder: the written folder.
        repo_id: ``ORG/NAME``; created when missing (`private` then applies).
        token: a Hub token (default: ``HF_TOKEN`` or the saved login).
        revision: a branch to commit to, created from the default branch when missing.
        api: defaults to ``huggingface_hub.HfApi(token=token)`` (endpoint from
            ``HF_ENDPOINT``).

    Raises:
        ModelError: not a written folder, a bad repo id, or the Hub refused or was not
            reachable (one line; the folder stays as written).

    Example:
        >>> push_to_hub("runs/lite0-cpu-0.5", "me/lite0-cpu-0.5")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a saved model folder (no config.json)")
    check_repo_id(repo_id)
    message = commit_message or "Add HANT-compressed model"
    report_file = folder / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        atomic_write(folder / "README.md", lambda p: p.write_text(model_card(report, repo_id)))
        message = commit_message or headline(report)
    api = api or HfApi(token=token, library_name="hant-compressor")
    try:
        with _hub_errors_only():
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            repo_id = getattr(repo, "repo_id", repo_id)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                     commit_message=message, revision=revision)
    except _HUB_ERRORS as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"upload to {repo_id} failed: {first} (the folder is written at "
                         f"{folder}; run `hant push {folder} {repo_id}` to try again)") from e
    return str(getattr(info, "commit_url", info))


@contextlib.contextmanager
def _hub_errors_only():
    """huggingface_hub retries a failed request (5 times, with backoff) and logs a warning
    line for each try; the upload's one line says whether it failed in the end."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid ``ORG/NAME`` Hub model id, else ModelError (one line)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelError(f"--push-to-hub {repo_id!r} is not a Hub repo id: "
                         f"{str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise ModelError(f"--push-to-hub wants ORG/NAME (an account or organisation, a slash, "
                         f"a name), got {repo_id!r}")
    return repo_id
