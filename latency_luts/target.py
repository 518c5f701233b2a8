"""Hardware targets: named profiles (``targets.yaml``) in a registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources

import yaml

from ._errors import UnknownTargetError

__all__ = ["Target", "get_target", "list_targets", "register_target"]


@dataclass(frozen=True)
class Target:
    """How latency is measured for one piece of hardware."""

    name: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    batch: int = 1
    threads: int = 1
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    if target.name in _TARGETS:
        raise ValueError(f"A target is already registered under '{target.name}'")
    _TARGETS[target.name] = target
    return target


def _load_profiles() -> None:
    text = resources.files("latency_luts").joinpath("targets.yaml").read_text()
    for name, spec in (yaml.safe_load(text) or {}).items():
        register_target(Target.from_dict({"name": name, **spec}))


def list_targets() -> list[str]:
    return sorted(_TARGETS)


def get_target(name: str | Target) -> Target:
    """A target by profile name (objects pass through)."""
    if isinstance(name, Target):
        return name
    if name not in _TARGETS:
        raise UnknownTargetError(
            f"unknown target '{name}'; known targets: {', '.join(list_targets())} "
            "(or pass a LUT file built with `hant lut build`)"
        )
    return _TARGETS[name]


_load_profiles()
