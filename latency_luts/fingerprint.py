"""The environment a LUT was measured in."""

from __future__ import annotations

import os
import platform

from .target import Target

__all__ = ["environment_fingerprint"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_fingerprint(target: Target, backend_info: dict) -> dict:
    return {
        "device": _cpu_model() if target.device == "cpu" else target.device,
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": target.threads,
        "precision": target.precision,
        "batch": target.batch,
        **backend_info,
    }
