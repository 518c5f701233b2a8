"""Fitness a_ij (HANT section 3, "Target Hardware"): the change in the teacher's loss when op j
alone replaces teacher layer i, measured on the search images. The loss is the KL divergence to
the teacher's predictions (``fitness.loss: kl``, the default: paired with the teacher, so less
noisy on a few images than a label loss), or cross-entropy where the images have labels
(``ce``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import ArtifactError
from .data import ImageSource
from .recipe import DataCfg, FitnessCfg
from .runtime import Runtime
from .search import min_latency
from .split import TEACHER, Split

__all__ = ["Fitness", "fitness", "task_loss", "Prefiltered", "prefilter", "donnav2_filter"]


LOSSES = ("kl", "ce")


def task_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor,
              kind: str = "kl") -> torch.Tensor:
    """Per-image loss: ``kl``: KL(teacher || model); ``ce``: CE to the label where there is
    one, else KL."""
    if kind not in LOSSES:
        raise ValueError(f"the loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    labelled = (y >= 0) & (kind == "ce")
    ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
    kl = F.kl_div(
        F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
        reduction="none",
    ).sum(-1)
    return torch.where(labelled, ce, kl)


def _correct(logits, y, teacher_logits) -> torch.Tensor:
    target = torch.where(y >= 0, y, teacher_logits.argmax(-1))
    return (logits.argmax(-1) == target).float()


@dataclass
class Fitness:
    """a[i][op] = loss change, acc_drop[i][op] = accuracy drop in points (teacher = 0)."""

    teacher_loss: float
    teacher_acc: float
    images: int
    a: list[dict[str, float]] = field(default_factory=list)
    acc_drop: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"teacher_loss": self.teacher_loss, "teacher_acc": self.teacher_acc,
                "images": self.images, "a": self.a, "acc_drop": self.acc_drop}

    @classmethod
    def from_dict(cls, d: dict) -> Fitness:
        return cls(**d)

    def save(self, store, path) -> None:
        store.write_json(path, self.to_dict())

    @classmethod
    def load(cls, store, path) -> Fitness:
        try:
            return cls.from_dict(store.read_json(path))
        except TypeError as e:  # parsed, but not a fitness table
            raise ArtifactError(f"work-dir artifact {path} is not a fitness table ({e}); "
                                "delete it and run again") from e


@torch.no_grad()
def fitness(
    split: Split,
    ops: dict[int, dict[str, nn.Module]],
    images: ImageSource,
    batch_size: int = DataCfg.batch_size,
    progress: bool = True,
    runtime: Runtime | None = None,
    loss: str = FitnessCfg.loss,
) -> Fitness:
    """Score every distilled op (`ops[i][name]`) plugged alone into the teacher, on `runtime`'s
    device (default: the CPU, fp32), over `images` through the eval transform, by the change
    in `loss` (see :func:`task_loss`)."""
    from tqdm import tqdm

    runtime = runtime or Runtime.cpu()
    stem = runtime.module(split.stem).eval()
    layers = [runtime.module(layer.module).eval() for layer in split.layers]
    head = runtime.module(split.head).eval()
    ops = {i: {name: runtime.module(m).eval() for name, m in layer.items()}
           for i, layer in ops.items()}
    loss_sum = [{name: 0.0 for name in ops[i]} for i in range(len(split.layers))]
    corr_sum = [{name: 0.0 for name in ops[i]} for i in range(len(split.layers))]
    t_loss = t_corr = 0.0
    n = 0
    total = sum(len(v) for v in ops.values()) * math.ceil(len(images) / batch_size)
    bar = tqdm(total=total, desc="fitness", unit="op-batch", disable=not progress)
    for batch in images.batches(batch_size):
        y = batch.y.to(runtime.device)
        with runtime.autocast():
            acts = [stem(runtime.input(batch.x))]
            for m in layers:
                acts.append(m(acts[-1]))
            t_logits = head(acts[-1]).float()
        n += len(y)
        t_loss += float(task_loss(t_logits, y, t_logits, loss).sum())
        t_corr += float(_correct(t_logits, y, t_logits).sum())
        for i, layer_ops in ops.items():
            for name, m in layer_ops.items():
                bar.update(1)
                if name == TEACHER:
                    continue
                with runtime.autocast():
                    h = m(acts[i])
                    for layer in layers[i + 1 :]:
                        h = layer(h)
                    logits = head(h).float()
                loss_sum[i][name] += float(task_loss(logits, y, t_logits, loss).sum())
                corr_sum[i][name] += float(_correct(logits, y, t_logits).sum())
    bar.close()
    t_loss /= n
    t_acc = 100.0 * t_corr / n
    a, drop = [], []
    for i in range(len(split.layers)):
        a.append({k: (0.0 if k == TEACHER else v / n - t_loss) for k, v in loss_sum[i].items()})
        drop.append(
            {k: (0.0 if k == TEACHER else t_acc - 100.0 * v / n) for k, v in corr_sum[i].items()}
        )
    return Fitness(t_loss, t_acc, n, a, drop)


@dataclass
class Prefiltered:
    """What the search may choose from: a[i][op] of the ops kept, and what each filter removed
    (the report's ``search.prefilter``)."""

    a: list[dict[str, float]]
    info: dict
    notes: list[str] = field(default_factory=list)


def prefilter(fit: Fitness, b: list[dict[str, float]], distill_loss, cfg: FitnessCfg,
              budget_ms: float, candidates: int, failed: int,
              untrained_slower: int = 0) -> Prefiltered:
    """HANT's prefilter: drop ops slower than the teacher's layer or losing more than
    `max_accuracy_drop` points, and with ``donnav2_filter`` DONNAv2's dominance filter. The
    accuracy part is skipped (and reported) if it would leave no architecture within
    `budget_ms`.

    Args:
        b: the latencies (ms) of every op.
        distill_loss: (layer, op) -> distillation loss, for DONNAv2's filter.
        candidates, failed: how many ops there were and how many failed to distil (report).
        untrained_slower: ops the latency filter kept from distillation (not in `fit`, but
            removed by the same filter: counted with it in the report).
    """
    by_latency = [{op: a for op, a in fit.a[i].items() if b[i][op] <= b[i][TEACHER]}
                  for i in range(len(fit.a))]
    slower = untrained_slower + sum(len(fit.a[i]) - len(by_latency[i])
                                    for i in range(len(fit.a)))
    dominated = 0
    if cfg.donnav2_filter:
        by_latency, dominated = donnav2_filter(by_latency, b, distill_loss)
    limit = cfg.max_accuracy_drop
    by_acc = [{op: a for op, a in layer.items() if fit.acc_drop[i][op] <= limit}
              for i, layer in enumerate(by_latency)]
    info = {
        "candidates": candidates,
        "removed_slower_than_teacher": slower,
        "removed_failed_distillation": failed,
        "removed_dominated_donnav2": dominated,
        "removed_accuracy_drop": sum(map(len, by_latency)) - sum(map(len, by_acc)),
        "accuracy_filter_applied": True,
    }
    keep, notes = by_acc, []
    if min_latency([{op: b[i][op] for op in layer} for i, layer in enumerate(by_acc)]) > budget_ms:
        keep = by_latency
        info.update(accuracy_filter_applied=False, removed_accuracy_drop=0)
        notes.append(f"accuracy prefilter (>{limit} points) skipped: it would leave no "
                     "architecture within the budget")
    info["kept"] = sum(map(len, keep))
    return Prefiltered(keep, info, notes)


def donnav2_filter(layers: list[dict[str, float]], b: list[dict[str, float]],
                   distill_loss) -> tuple[list[dict[str, float]], int]:
    """DONNAv2's filter: drop an op when another op of the same layer is at least as good in
    distillation loss and latency and better in one (the teacher counts with loss 0)."""
    out, removed = [], 0
    for i, layer in enumerate(layers):
        loss = {op: distill_loss(i, op) for op in layer}
        keep = {}
        for op, a in layer.items():
            if any(loss[o] <= loss[op] and b[i][o] <= b[i][op]
                   and (loss[o] < loss[op] or b[i][o] < b[i][op]) for o in layer if o != op):
                removed += 1
            else:
                keep[op] = a
        out.append(keep)
    return out, removed
