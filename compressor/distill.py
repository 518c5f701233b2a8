"""Phase 1 (HANT Eq. 2): every candidate op s_ij mimics its teacher layer t_i on t_i's input.

The N x M problems are independent. Each teacher pass over a batch records every layer's input
and output once; a *group* of candidate ops per layer (all layers at once) then trains on those
activations. Each group is saved when done, so an interrupted run resumes at group granularity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import Images
from .recipe import DistillCfg
from .split import TEACHER, Split
from .store import Store

__all__ = ["OpResult", "distill", "teacher_activations", "load_op", "load_weights"]

_logger = logging.getLogger(__name__)


@dataclass
class OpResult:
    layer: int
    op: str
    loss: float
    status: str = "ok"  # ok | failed
    reason: str = ""

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "loss": self.loss, "status": self.status,
                "reason": self.reason}


def _files(root: Path, layer: int, op: str) -> tuple[Path, Path]:
    d = root / f"{layer:03d}"
    return d / f"{op}.safetensors", d / f"{op}.json"


@torch.no_grad()
def teacher_activations(split: Split, x: torch.Tensor) -> list[torch.Tensor]:
    """[x_0, x_1, ..., x_N]: the input of every layer and the last layer's output."""
    acts = [split.stem(x)]
    for layer in split.layers:
        acts.append(layer.module(acts[-1]))
    return acts


def load_weights(store: Store, root: Path, layer: int, op: str) -> dict[str, torch.Tensor]:
    """The distilled state dict of (layer, op)."""
    return store.load_tensors(_files(root, layer, op)[0])


def load_op(split: Split, store: Store, root: Path, layer: int, op: str) -> nn.Module:
    """A candidate op with its distilled weights (the teacher op is the teacher's layer)."""
    module = split.build_op(layer, op)
    if op != TEACHER:
        module.load_state_dict(load_weights(store, root, layer, op))
    return module


def _done(store: Store, root: Path, layer: int, op: str) -> OpResult | None:
    weights, meta = _files(root, layer, op)
    if meta.is_file() and weights.is_file():
        d = store.read_json(meta)
        return OpResult(**d)
    return None


def distill(
    split: Split,
    candidates: dict[int, list[str]],
    images: Images,
    cfg: DistillCfg,
    store: Store,
    root: Path,
    progress: bool = True,
) -> dict[tuple[int, str], OpResult]:
    """Train every (layer, op) in `candidates` (except ``teacher``); resumes from `root`."""
    from tqdm import tqdm

    results: dict[tuple[int, str], OpResult] = {}
    pending: dict[int, list[str]] = {}
    for i, ops in candidates.items():
        for op in ops:
            if op == TEACHER:
                continue
            done = _done(store, root, i, op)
            if done is not None:
                results[(i, op)] = done
            else:
                pending.setdefault(i, []).append(op)
    total = sum(len(v) for v in pending.values())
    if total == 0:
        return results
    g = max(1, cfg.group_size)
    rounds = math.ceil(max(len(v) for v in pending.values()) / g)
    n = len(images)
    bs = max(1, min(cfg.batch_size, n))
    steps = cfg.epochs * math.ceil(n / bs)
    split.stem.eval()
    for layer in split.layers:
        layer.module.eval()
    scale = _layer_scales(split, images.x[:bs])
    bar = tqdm(total=total * steps, desc="distill", unit="op-step", disable=not progress)
    for r in range(rounds):
        group = [(i, op) for i, ops in pending.items() for op in ops[r * g : (r + 1) * g]]
        trained = _train_group(split, group, images, cfg, bs, scale, bar)
        for (i, op), (res, state) in trained.items():
            weights, meta = _files(root, i, op)
            store.save_tensors(weights, state)
            store.write_json(meta, res.to_dict())
            results[(i, op)] = res
    bar.close()
    return results


def _layer_scales(split: Split, x: torch.Tensor) -> list[float]:
    """Mean square of each teacher layer's output: a per-layer constant that makes the MSE
    comparable across layers (one learning rate suits all)."""
    acts = teacher_activations(split, x)
    return [max(float(a.pow(2).mean()), 1e-6) for a in acts[1:]]


def _loss(kind: str, out: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """``mse``: Eq. 2's MSE, divided by the layer's constant mean square (one lr for all layers).
    ``nsr``: DONNA's per-channel noise-to-signal ratio, mean over channels (channels are dim 1
    of conv maps (B, C, H, W) and the last dim of tokens (B, T, D))."""
    if kind == "mse":
        return F.mse_loss(out, target) / scale
    if kind == "nsr":
        dims = (0, 2, 3) if target.dim() == 4 else tuple(range(target.dim() - 1))
        noise = (out - target).pow(2).sum(dims)
        signal = target.pow(2).sum(dims).clamp_min(1e-8)
        return (noise / signal).mean()
    raise ValueError(f"distill.loss must be mse or nsr, got {kind!r}")


def _optimizer(cfg: DistillCfg, params) -> torch.optim.Optimizer:
    """SGD without weight decay (the paper's choice), or Adam for small calibration sets where
    only a few hundred steps are possible."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)
    raise ValueError(f"distill.optimizer must be sgd or adam, got {cfg.optimizer!r}")


def _train_group(split, group, images: Images, cfg: DistillCfg, bs, scale, bar):
    ops: dict[tuple[int, str], nn.Module] = {}
    opts: dict[tuple[int, str], torch.optim.Optimizer | None] = {}
    for i, op in group:
        m = split.build_op(i, op).train()
        ops[(i, op)] = m
        params = [p for p in m.parameters() if p.requires_grad]
        opts[(i, op)] = _optimizer(cfg, params) if params else None
    failed: dict[tuple[int, str], str] = {}
    sums = dict.fromkeys(ops, 0.0)
    counts = dict.fromkeys(ops, 0)
    gen = torch.Generator().manual_seed(0)
    n = len(images)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        last = epoch == cfg.epochs - 1
        for s in range(0, n, bs):
            acts = teacher_activations(split, images.x[order[s : s + bs]])
            for key, m in ops.items():
                bar.update(1)
                if key in failed:
                    continue
                i = key[0]
                out = m(acts[i])
                loss = _loss(cfg.loss, out, acts[i + 1], scale[i])
                if not torch.isfinite(loss):
                    failed[key] = f"non-finite loss at epoch {epoch}, batch {s // bs}"
                    _logger.warning("op %s on layer %d diverged: %s", key[1], i, failed[key])
                    continue
                if opts[key] is not None:
                    opts[key].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[key].step()
                if last:
                    sums[key] += loss.item() * len(out)
                    counts[key] += len(out)
    out = {}
    for key, m in ops.items():
        status, reason = ("failed", failed[key]) if key in failed else ("ok", "")
        loss = sums[key] / counts[key] if counts[key] and key not in failed else float("nan")
        out[key] = (OpResult(key[0], key[1], loss, status, reason), m.state_dict())
    return out
