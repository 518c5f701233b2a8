"""Accuracy and agreement of a model on decoded images."""

from __future__ import annotations

import torch
from torch import nn

from .data import Images
from .fitness import task_loss

__all__ = ["predict", "evaluate", "mean_loss"]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)])
    finally:
        model.train(was)


def evaluate(logits: torch.Tensor, images: Images, teacher_logits: torch.Tensor | None = None):
    """{'top1': % correct on labelled images (None if none), 'agreement': % same top-1 as
    the teacher (None without teacher logits), 'images': n}."""
    pred = logits.argmax(-1)
    lab = images.y >= 0
    out = {
        "top1": round(100.0 * float((pred[lab] == images.y[lab]).float().mean()), 3)
        if bool(lab.any())
        else None,
        "labelled_images": int(lab.sum()),
        "images": len(images),
    }
    if teacher_logits is not None:
        agree = (pred == teacher_logits.argmax(-1)).float().mean()
        out["agreement"] = round(100.0 * float(agree), 3)
    return out


def mean_loss(logits: torch.Tensor, images: Images, teacher_logits: torch.Tensor) -> float:
    return float(task_loss(logits, images.y, teacher_logits).mean())
