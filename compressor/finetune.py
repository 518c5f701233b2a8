"""Finetune the chosen student (HANT Eq. 1 with gamma_MSE = 0): CE to labels + KL to the teacher,
with timm's optimizer and scheduler factories."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from .data import Images
from .evaluate import predict
from .recipe import FinetuneCfg

__all__ = ["finetune"]

_logger = logging.getLogger(__name__)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    images: Images,
    cfg: FinetuneCfg,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Train `student` in place; returns {'epochs', 'steps', 'final_loss'}."""
    from tqdm import tqdm

    if cfg.epochs <= 0:
        return {"epochs": 0, "steps": 0, "final_loss": None}
    n = len(images)
    bs = max(1, min(cfg.batch_size, n))
    steps_per_epoch = math.ceil(n / bs)
    t_logits = predict(teacher, images.x)
    opt_args = {"momentum": cfg.momentum} if cfg.opt.lower() in ("sgd", "momentum") else {}
    optimizer = create_optimizer_v2(
        student, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **opt_args
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    gen = torch.Generator().manual_seed(seed)
    student.train()
    temp = cfg.kl_temperature
    step = 0
    last = float("nan")
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="finetune", disable=not progress)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            x, y, tl = images.x[idx], images.y[idx], t_logits[idx]
            logits = student(x)
            loss = cfg.gamma_kl * F.kl_div(
                F.log_softmax(logits / temp, -1), F.log_softmax(tl / temp, -1),
                log_target=True, reduction="batchmean",
            ) * temp * temp
            lab = y >= 0
            if cfg.gamma_ce and bool(lab.any()):
                loss = loss + cfg.gamma_ce * F.cross_entropy(logits[lab], y[lab])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"finetune loss became {float(loss)} at epoch {epoch}; lower finetune.lr "
                    "in the recipe"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            total += loss.item() * len(idx)
            bar.update(1)
        last = total / n
        scheduler.step(epoch + 1)
        bar.set_postfix(loss=f"{last:.3f}")
    bar.close()
    student.eval()
    return {"epochs": cfg.epochs, "steps": step, "final_loss": last}
