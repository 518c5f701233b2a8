"""Hardware targets: named profiles (``targets.yaml``) in a registry.

Example:
    >>> from latency_luts import get_target
    >>> get_target("v100").precision, get_target("v100").batch
    ('fp16', 128)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources

import yaml

from ._errors import UnknownTargetError

__all__ = ["Target", "get_target", "list_targets", "register_target", "PRECISIONS"]

#: bytes per element of each supported precision
PRECISIONS = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Target:
    """How latency is measured (or, without the hardware, estimated) for one piece of hardware.

    Fields are documented in ``latency_luts/targets.yaml``. ``threads=0`` means all CPU cores;
    ``clock`` is ``wall`` or ``thread`` (see `latency_luts.measure_stable`).
    ``device_match`` holds case-insensitive regexes that identify the hardware on a machine
    (see `latency_luts.hardware_present`); the peak figures feed the roofline estimate.
    """

    name: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    batch: int = 1
    threads: int = 1
    description: str = ""
    hardware: str = ""
    channels_last: bool = False
    device_match: tuple[str, ...] = ()
    peak_tflops: float = 0.0
    mem_bandwidth_gbs: float = 0.0
    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    launch_overhead_us: float = 0.0
    fuse_pointwise: bool = False
    source: str = ""
    clock: str = "wall"

    def __post_init__(self):
        object.__setattr__(self, "device_match", tuple(self.device_match or ()))
        if self.precision not in PRECISIONS:
            raise ValueError(f"target '{self.name}': precision must be one of "
                             f"{', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.clock not in ("wall", "thread"):
            raise ValueError(f"target '{self.name}': clock must be wall or thread, "
                             f"got '{self.clock}'")
        if self.clock == "thread" and (self.device != "cpu" or self.threads != 1):
            raise ValueError(f"target '{self.name}': clock 'thread' (CPU time of the calling "
                             "thread) is only valid on the CPU with threads: 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"target '{self.name}': device must be cpu or cuda, "
                             f"got '{self.device}'")

    @property
    def can_estimate(self) -> bool:
        """True if the profile has the peak figures a roofline estimate needs."""
        return self.peak_tflops > 0 and self.mem_bandwidth_gbs > 0

    @property
    def bytes_per_element(self) -> int:
        return PRECISIONS[self.precision]

    def num_threads(self) -> int:
        """The thread count to measure with (``threads=0``: all CPU cores of this machine)."""
        return self.threads if self.threads > 0 else (os.cpu_count() or 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["device_match"] = list(self.device_match)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target profile; names are unique.

    Example:
        >>> import latency_luts
        >>> t = latency_luts.register_target(latency_luts.Target("my-cpu", threads=4))
        ... # doctest: +SKIP
    """
    if target.name in _TARGETS:
        raise ValueError(f"A target is already registered under '{target.name}'")
    _TARGETS[target.name] = target
    return target


def _load_profiles() -> None:
    text = resources.files("latency_luts").joinpath("targets.yaml").read_text()
    for name, spec in (yaml.safe_load(text) or {}).items():
        register_target(Target.from_dict({"name": name, **spec}))


def list_targets() -> list[str]:
    """Names of the registered target profiles, sorted."""
    return sorted(_TARGETS)


def get_target(name: str | Target) -> Target:
    """A target by profile name (objects pass through).

    Raises:
        UnknownTargetError: the name is not a profile; the message lists the known ones.
    """
    if isinstance(name, Target):
        return name
    if name not in _TARGETS:
        raise UnknownTargetError(
            f"unknown target '{name}'; known targets: {', '.join(list_targets())} "
            "(or pass a LUT file built with `hant lut build`)"
        )
    return _TARGETS[name]


_load_profiles()
