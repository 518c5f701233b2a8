"""The transformed architecture as a timm model, so stock ``timm.create_model`` rebuilds it.

``config.json`` written by `save_pretrained` has ``"architecture": "hant_transformed"`` and
``model_args`` naming the teacher and the chosen ops; after ``import compressor``,
``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``hf-hub:ORG/NAME``) builds the
teacher with random weights, splits it, assembles the chosen ops, and loads the saved weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

import ops_pool

from ._errors import ModelError
from .split import TransformedNet, split

__all__ = ["HantNet", "ARCHITECTURE", "student_pretrained_cfg"]

ARCHITECTURE = "hant_transformed"
_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
              "num_classes", "fixed_input_size", "test_input_size", "min_input_size")


def student_pretrained_cfg(teacher_cfg: dict) -> dict:
    """The student keeps the teacher's preprocessing."""
    cfg = {k: teacher_cfg[k] for k in _DATA_KEYS if k in teacher_cfg}
    cfg.update(architecture=ARCHITECTURE, first_conv="", classifier="", license="apache-2.0")
    return cfg


class HantNet(TransformedNet):
    """A teacher (timm name) with its layers replaced by `choices`."""

    def __init__(
        self,
        teacher: str | None = None,
        choices: Sequence[str] = (),
        teacher_args: dict | None = None,
        input_size: Sequence[int] | None = None,
        channel_divisor: int = ops_pool.CHANNEL_DIVISOR,
        layers: Sequence[str] | None = None,
        **kwargs,
    ):
        if not isinstance(teacher, str) or not timm.is_model(teacher):
            raise ModelError(
                f"this checkpoint was compressed from a model timm does not know ({teacher!r}); "
                "load it with compressor.load(DIR, teacher=<the same architecture>)"
            )
        args = dict(teacher_args or {})
        args.update({k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans",
                                                              "global_pool")})
        net = timm.create_model(teacher, pretrained=False, **args)
        s = split(net.eval(), input_size=input_size, layers=layers)
        with ops_pool.channel_divisor(channel_divisor):
            built = s.assemble(list(choices))
        super().__init__(built.stem, list(built.layers), built.head, built.choices,
                         classifier=built.classifier_name)
        self.feature_info = built.feature_info
        self.num_classes = getattr(net, "num_classes", 0)
        self.num_features = getattr(net, "num_features", 0)
        self.teacher_name = teacher
        self.channel_divisor = channel_divisor
        self.layer_patterns = s.patterns


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "", "classifier": "", **kwargs}


default_cfgs = generate_default_cfgs({ARCHITECTURE: _cfg()})


@register_model
def hant_transformed(pretrained: bool = False, **kwargs) -> HantNet:
    """A HANT-transformed network; ``model_args`` name the teacher and the chosen ops."""
    return build_model_with_cfg(HantNet, ARCHITECTURE, pretrained, **kwargs)
