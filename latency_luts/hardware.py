"""What hardware this machine has, and whether a target's hardware is here.

A target's hardware is *here* when:

- device ``cpu``: its ``device_match`` is empty (``cpu``: any CPU), or one of its regexes matches
  this machine's CPU model string (``/proc/cpuinfo`` "model name"; ``xeon`` matches any Xeon);
- device ``cuda``: ``torch.cuda.is_available()`` and, if ``device_match`` is set, one of its
  regexes matches ``torch.cuda.get_device_name(0)`` (``v100`` matches "Tesla V100-SXM2-16GB").

Example:
    >>> import latency_luts
    >>> latency_luts.hardware_present(latency_luts.get_target("cpu"))
    True
"""

from __future__ import annotations

import functools
import platform
import re

import torch

from .target import Target

__all__ = ["cpu_model", "gpu_name", "gpu_driver", "device_name", "hardware_present"]


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """This machine's CPU model string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """Name of CUDA device 0, or None without a CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def gpu_driver() -> str | None:
    """The NVIDIA kernel driver version, if one is loaded."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9.]+)", f.read())
            return m.group(1) if m else None
    except OSError:
        return None


def device_name(target: Target) -> str:
    """The name of the device on this machine that `target` would be measured on."""
    if target.device == "cpu":
        return cpu_model()
    return gpu_name() or "no CUDA GPU"


def hardware_present(target: Target) -> bool:
    """True if `target`'s hardware is on this machine (rules in the module docstring)."""
    if target.device == "cpu":
        here = cpu_model()
    else:
        here = gpu_name()
        if here is None:
            return False
    return not target.device_match or any(
        re.search(p, here, re.IGNORECASE) for p in target.device_match
    )
