"""The environment a LUT was measured in."""

from __future__ import annotations

import os
import platform

from .hardware import cpu_model, device_name, gpu_driver
from .target import Target

__all__ = ["environment_fingerprint"]


def environment_fingerprint(target: Target, backend_info: dict) -> dict:
    """Device, driver, library versions, threads, precision and batch of a measurement.

    `backend_info` is the backend's ``fingerprint()`` (library versions); with
    ``"estimated": True`` in it (a roofline estimate) ``device`` names the estimated hardware
    and ``measured_on`` this machine.

    Example:
        >>> import latency_luts
        >>> t = latency_luts.get_target("cpu")
        >>> fp = latency_luts.environment_fingerprint(t, {})
        >>> sorted(k for k in fp if k in ("device", "threads", "precision", "batch"))
        ['batch', 'device', 'precision', 'threads']
    """
    here = device_name(target)
    estimated = bool(backend_info.get("estimated"))
    return {
        "target": target.name,
        "backend": "roofline" if estimated else target.backend,
        "device": f"estimate: {target.hardware or target.name}" if estimated else here,
        "measured_on": here,
        "driver": gpu_driver() if target.device == "cuda" else None,
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": target.num_threads(),
        "precision": target.precision,
        "batch": target.batch,
        "channels_last": target.channels_last,
        "clock": target.clock,
        **backend_info,
    }
