"""Where the distillation runs: the device, its free memory, and the torchrun process group.

torchrun (``torchrun --nproc_per_node=P -m compressor distill ...``) sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; `process_group` reads them, starts gloo on
CPU or NCCL on CUDA, and ends the group again if it started it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ._errors import DistillError

__all__ = ["resolve_device", "available_bytes", "process_group", "barrier", "all_gather"]

_logger = logging.getLogger(__name__)

# Ranks wait for each other at the end of the phase; shards of very different cost can keep a
# fast rank waiting for hours, so the group's timeout is long.
GROUP_TIMEOUT = timedelta(hours=24)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this rank's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistillError(
                f"device {name!r} (--device, recipe runtime.device) asks for CUDA, which is "
                "not available here; pass --device auto or cpu"
            )
        if device.index is None:
            device = torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: torch.device) -> int:
    """Memory this process may use on `device`: free GPU memory (``cuda.mem_get_info``), or
    the host's available memory (psutil, else /proc/meminfo, else sysconf) divided among the
    ranks of this node (they share it)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30  # unknown: assume a small machine
    return avail // max(1, _env_int("LOCAL_WORLD_SIZE", 1))


@contextlib.contextmanager
def process_group(device: torch.device):
    """Yield (rank, world size). Under torchrun (``WORLD_SIZE`` > 1) this starts the default
    process group (gloo on CPU, NCCL on CUDA) unless the caller already did, and destroys what
    it started on the way out."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield 0, 1
        return
    if not dist.is_available():
        raise DistillError(
            "WORLD_SIZE is set (torchrun) but this torch build has no torch.distributed; "
            "run without torchrun"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=GROUP_TIMEOUT, **kwargs)
    _logger.info("distill: rank %d of %d (%s)", dist.get_rank(), world, backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def barrier(device: torch.device) -> None:
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def all_gather(value) -> list:
    """Every rank's `value` (picklable), in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
