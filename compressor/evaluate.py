"""Logits of a model over streamed images, and the accuracy, agreement and loss they give."""

from __future__ import annotations

import torch
from torch import nn

from .data import ImageSource
from .fitness import task_loss
from .runtime import Runtime

__all__ = ["Logits", "predict", "evaluate", "mean_loss"]


class Logits:
    """A model's logits over a part (fp32, on the CPU) and the labels of the same images
    (-1 = unlabelled); unreadable files are absent from both."""

    def __init__(self, logits: torch.Tensor, y: torch.Tensor):
        self.logits, self.y = logits, y

    def __len__(self) -> int:
        return len(self.y)


@torch.no_grad()
def predict(model: nn.Module, images: ImageSource, runtime: Runtime | None = None,
            batch_size: int = 50, progress: str | None = None) -> Logits:
    """`model`'s logits over `images` (eval transform) on `runtime`'s device (default: the CPU,
    fp32)."""
    runtime = runtime or Runtime.cpu()
    was = model.training
    net = runtime.module(model).eval()
    out, ys = [], []
    try:
        for batch in images.batches(batch_size, progress=progress):
            with runtime.autocast():
                out.append(net(runtime.input(batch.x)).float().cpu())
            ys.append(batch.y)
    finally:
        model.train(was)
    return Logits(torch.cat(out), torch.cat(ys))


def evaluate(student: Logits, teacher: Logits | None = None) -> dict:
    """{'top1': % correct on labelled images (None if none), 'agreement': % same top-1 as
    the teacher (None without teacher logits), 'images': n}."""
    pred = student.logits.argmax(-1)
    y = student.y
    lab = y >= 0
    out = {
        "top1": round(100.0 * float((pred[lab] == y[lab]).float().mean()), 3)
        if bool(lab.any())
        else None,
        "labelled_images": int(lab.sum()),
        "images": len(y),
    }
    if teacher is not None:
        agree = (pred == teacher.logits.argmax(-1)).float().mean()
        out["agreement"] = round(100.0 * float(agree), 3)
    return out


def mean_loss(student: Logits, teacher: Logits, kind: str = "kl") -> float:
    """Mean task loss (:func:`task_loss`): KL to the teacher's logits of the same images, or
    with ``ce`` cross-entropy where labelled."""
    return float(task_loss(student.logits, student.y, teacher.logits, kind).mean())
