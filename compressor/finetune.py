"""Finetune the chosen student (HANT Eq. 1 with gamma_MSE = 0) with timm's training pieces.

Every step sees a fresh augmented view (timm's train transform, optionally timm's Mixup /
CutMix), and the teacher's targets come from that same view (consistent teaching): KL to the
teacher at a temperature, plus CE (label smoothing, or mixup's soft targets) when every image has
a label. timm's optimizer and scheduler factories, `ModelEmaV3` (EMA weights with warm-up),
`NativeScaler` under fp16 autocast on CUDA, and gradient clipping. After every epoch the loss
on the search part (never the held-out part) is logged for the raw and the EMA weights, and a
checkpoint is written, so an interrupted finetune resumes at its epoch; the weights kept at the
end are the EMA's when their search-part loss is lower.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import nn

from .data import ImageSource
from .evaluate import Logits, mean_loss, predict
from .recipe import FinetuneCfg
from .runtime import Runtime
from .split import TEACHER
from .store import atomic_write

__all__ = ["finetune", "kd_loss"]

_logger = logging.getLogger(__name__)


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at `temperature`, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def _epoch_order(n: int, bs: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The batches of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed finetune sees the same batches as an uninterrupted one."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    return [order[s : s + bs] for s in range(0, n, bs)]


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    images: ImageSource,
    cfg: FinetuneCfg,
    progress: bool = True,
    seed: int = 0,
    *,
    val: ImageSource | None = None,
    runtime: Runtime | None = None,
    checkpoint: Path | None = None,
    teacher_features: nn.Module | None = None,
) -> dict:
    """Train `student` in place on `images`; returns what happened (epochs, steps, per-epoch
    training and search-part losses, which weights were kept, the epoch it resumed from).

    Args:
        val: the search part: its loss is logged before training, after the feature stage and
            per epoch; the weights kept at the end are those with the lowest one (``kept``:
            ``start`` or ``features`` at ``kept_epoch`` 0, else ``raw`` or ``ema``), and
            ``cfg.patience`` stops on it.
        runtime: device and autocast (default: the CPU, fp32).
        checkpoint: a file for the per-epoch checkpoint (resumed from when present).
        teacher_features: for ``cfg.feature_epochs``: a module whose ``forward_features(x)``
            gives the teacher's features that the student's ``forward_features`` must match
            (the input of the head: the last layer's output).
    """
    from tqdm import tqdm

    rec: dict = {"epochs": cfg.epochs, "steps": 0, "final_loss": None, "history": [],
                 "kept": "raw", "kept_epoch": None, "resumed_from_epoch": 0,
                 "feature_stage": None, "start_search_loss": None}
    if cfg.epochs <= 0 and cfg.feature_epochs <= 0:
        return rec
    runtime = runtime or Runtime.cpu()
    n = len(images)
    bs = max(1, min(cfg.batch_size, n))
    steps_per_epoch = math.ceil(n / bs)
    net = runtime.module(student).train()
    t_net = runtime.module(teacher).eval()
    optimizer = _optimizer(net, cfg, cfg.lr)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=max(cfg.epochs, 1),  # 0: feature stage only
        warmup_epochs=cfg.warmup_epochs,
        decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    scaler = NativeScaler(device="cuda") if runtime.amp == torch.float16 else None
    use_ce = cfg.gamma_ce > 0 and images.labelled
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      label_smoothing=cfg.label_smoothing,
                      num_classes=getattr(student, "num_classes", 1000) or 1000)
    soft_ce = SoftTargetCrossEntropy()
    t_val = predict(teacher, val, runtime) if val is not None else None

    start = 0
    best: dict = {"loss": math.inf}  # the weights with the lowest search-part loss
    resuming = checkpoint is not None and checkpoint.is_file()
    if not resuming:
        if cfg.feature_epochs > 0 and teacher_features is None:
            raise ValueError("finetune.feature_epochs needs teacher_features")
        # the weights before any training are candidates too (epoch 0): on a small set the
        # finetune can end further from the teacher than it began, and the search part says so
        if cfg.keep_start:
            _consider(best, "start", net, val, t_val, runtime, rec)
        if cfg.feature_epochs > 0:  # a resumed finetune has it in its weights
            rec["feature_stage"] = _feature_stage(net, runtime.module(teacher_features).eval(),
                                                  images, cfg, runtime, seed, progress)
            if cfg.keep_start:
                _consider(best, "features", net, val, t_val, runtime, rec["feature_stage"])
    ema = ModelEmaV3(net, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    if resuming:
        start = _resume(checkpoint, net, optimizer, ema, scaler, rec, best)
        _logger.info("finetune: resuming after epoch %d from %s", start, checkpoint)
    step = start * steps_per_epoch
    params = [p for p in net.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=step, desc="finetune",
               disable=not progress)
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=_rng_devices(runtime)):  # the caller's streams stay
        try:
            for epoch in range(start, cfg.epochs):
                scheduler.step_update(num_updates=step)
                total, seen = 0.0, 0
                # Mixup draws from numpy, dropout and drop-path from torch: both seeded per
                # epoch, so a resumed finetune continues exactly as an uninterrupted one would
                np.random.seed((seed * 1_000_003 + epoch) % 2**32)
                torch.manual_seed(seed * 1_000_003 + epoch)
                _train_mode(net, cfg)
                order = _epoch_order(n, bs, seed, epoch)
                for batch in images.batches(order=order, train=cfg.augment, seed=seed,
                                            epoch=epoch):
                    x, y = runtime.input(batch.x), batch.y.to(runtime.device)
                    target = None
                    if mixup is not None and len(x) % 2 == 0:
                        x, target = mixup(x, y.clamp(min=0))
                    with torch.no_grad(), runtime.autocast():
                        t_logits = t_net(x).float()
                    with runtime.autocast():
                        logits = net(x).float()
                    loss = cfg.gamma_kl * kd_loss(logits, t_logits, cfg.kl_temperature)
                    if use_ce:
                        ce = (soft_ce(logits, target) if target is not None else
                              F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
                        loss = loss + cfg.gamma_ce * ce
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"finetune loss became {float(loss)} at epoch {epoch}; lower "
                            "finetune.lr in the recipe")
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler(loss, optimizer, clip_grad=cfg.clip_grad, parameters=params)
                    else:
                        loss.backward()
                        if cfg.clip_grad:
                            dispatch_clip_grad(params, cfg.clip_grad)
                        optimizer.step()
                    step += 1
                    scheduler.step_update(num_updates=step)
                    if ema is not None:
                        ema.update(net, step=step)
                    total += loss.item() * len(x)
                    seen += len(x)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(seen, 1):.3f}")
                entry = {"epoch": epoch + 1, "train_loss": total / max(seen, 1)}
                if t_val is not None:
                    entry["search_loss"] = _val_loss(net, val, t_val, runtime)
                    if ema is not None:
                        entry["search_loss_ema"] = _val_loss(ema.module, val, t_val, runtime)
                    ema_loss = (f" (EMA {entry['search_loss_ema']:.4f})" if ema is not None
                                else "")
                    _logger.info("finetune epoch %d/%d: train loss %.4f, search-part loss "
                                 "%.4f%s", epoch + 1, cfg.epochs, entry["train_loss"],
                                 entry["search_loss"], ema_loss)
                    weights = [("raw", net, "search_loss")]
                    if ema is not None:
                        weights.append(("ema", ema.module, "search_loss_ema"))
                    for which, m, key in weights:
                        _keep_if_lower(best, entry[key], epoch + 1, which, m)
                rec["history"].append(entry)
                if checkpoint is not None:
                    _save(checkpoint, epoch + 1, net, optimizer, ema, scaler, rec, best)
                if (cfg.patience and "epoch" in best
                        and epoch + 1 - best["epoch"] >= cfg.patience):
                    _logger.info("finetune: no lower search-part loss for %d epochs; stopping "
                                 "after epoch %d", cfg.patience, epoch + 1)
                    rec["stopped_early_after_epoch"] = epoch + 1
                    break
        finally:
            np.random.set_state(np_state)
            bar.close()
    last = rec["history"][-1] if rec["history"] else {}
    if "state" in best:  # the lowest search-part loss: epoch 0, or an epoch's raw/EMA
        student.load_state_dict(best["state"])
        rec["kept"], rec["kept_epoch"] = best["which"], best["epoch"]
        rec["kept_search_loss"] = best["loss"]
    elif net is not student:
        student.load_state_dict(net.state_dict())  # copies across devices
    student.eval()
    rec.update(steps=step, final_loss=last.get("train_loss"))
    return rec


def _feature_stage(net: nn.Module, t_feat: nn.Module, images: ImageSource, cfg: FinetuneCfg,
                   runtime: Runtime, seed: int, progress: bool) -> dict:
    """Before the finetune: the student's features matched to the teacher's on the same
    augmented views, by MSE over the teacher's mean square; the head, classifier included, is
    not trained here. ``cfg.feature_match``: ``last`` matches ``forward_features`` (the head's
    input); ``layers`` every layer's output from the first replaced layer on (the mean of the
    normalised MSEs), which needs two `TransformedNet`-shaped modules (``stem``, ``layers``)."""
    from tqdm import tqdm

    first = None  # last: forward_features only
    if cfg.feature_match == "layers":
        if not all(hasattr(m, "stem") and hasattr(m, "layers") for m in (net, t_feat)) or len(
                net.layers) != len(t_feat.layers):
            raise ValueError("finetune.feature_match: layers needs a student and teacher "
                             "with the same layers (stem, layers); use last")
        choices = getattr(net, "choices", None) or [None] * len(net.layers)
        first = next((i for i, c in enumerate(choices) if c != TEACHER), 0)

    n = len(images)
    bs = max(1, min(cfg.batch_size, n))
    body = [p for name, p in net.named_parameters()
            if p.requires_grad and not name.startswith("head.")]
    optimizer = _optimizer(body, cfg, cfg.feature_lr or cfg.lr)
    per_epoch = math.ceil(n / bs)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.feature_epochs,
                                       step_on_epochs=False, updates_per_epoch=per_epoch)
    bar = tqdm(total=cfg.feature_epochs * per_epoch, desc="finetune features",
               disable=not progress)
    history, step = [], 0
    with torch.random.fork_rng(devices=_rng_devices(runtime)):
        for epoch in range(cfg.feature_epochs):
            torch.manual_seed(seed * 1_000_003 + 500_009 + epoch)
            _train_mode(net, cfg)
            total, seen = 0.0, 0
            order = _epoch_order(n, bs, seed + 7, epoch)
            for batch in images.batches(order=order, train=cfg.augment, seed=seed + 7,
                                        epoch=epoch):
                x = runtime.input(batch.x)
                with torch.no_grad(), runtime.autocast():
                    targets = _features(t_feat, x, first)
                with runtime.autocast():
                    outs = _features(net, x, first)
                loss = sum(F.mse_loss(o, t) / t.pow(2).mean().clamp_min(1e-8)
                           for o, t in zip(outs, targets)) / len(targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"finetune feature loss became {float(loss)} at epoch {epoch}; lower "
                        "finetune.feature_lr in the recipe")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    dispatch_clip_grad(body, cfg.clip_grad)
                optimizer.step()
                step += 1
                scheduler.step_update(num_updates=step)
                total += loss.item() * len(x)
                seen += len(x)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(seen, 1):.3f}")
            history.append(total / max(seen, 1))
    bar.close()
    return {"epochs": cfg.feature_epochs, "train_loss": history}


def _features(m: nn.Module, x: torch.Tensor, first: int | None) -> list[torch.Tensor]:
    """``[m.forward_features(x)]`` (``first`` None), else the output of every layer of `m`
    from layer ``first`` on (fp32)."""
    if first is None:
        return [m.forward_features(x).float()]
    h, outs = m.stem(x), []
    for i, op in enumerate(m.layers):
        h = op(h)
        if i >= first:
            outs.append(h.float())
    return outs


def _optimizer(params, cfg: FinetuneCfg, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory with the recipe's settings (momentum for the SGD kinds)."""
    opt_args = {"momentum": cfg.momentum} if cfg.opt.lower() in ("sgd", "momentum") else {}
    return create_optimizer_v2(params, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                               **opt_args)


def _rng_devices(runtime: Runtime) -> list[torch.device]:
    """The devices whose random streams a training loop forks (the CUDA one, when used)."""
    return [runtime.device] if runtime.device.type == "cuda" else []


def _train_mode(net: nn.Module, cfg: FinetuneCfg) -> None:
    """`net` in train mode; with ``cfg.freeze_bn`` its BatchNorm layers stay in eval mode (their
    running statistics kept and used, their affine parameters still trained)."""
    net.train()
    if cfg.freeze_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _val_loss(model: nn.Module, val: ImageSource, t_val: Logits, runtime: Runtime) -> float:
    return mean_loss(predict(model, val, runtime), t_val)


def _consider(best: dict, which: str, model: nn.Module, val: ImageSource | None,
              t_val: Logits | None, runtime: Runtime, rec: dict | None) -> None:
    """Before the first epoch: `model`'s search-part loss (into ``rec["search_loss"]``), and
    its weights as the best so far (epoch 0, `which`) when lower. Nothing without a search part."""
    if val is None or t_val is None:
        return
    loss = _val_loss(model, val, t_val, runtime)
    if rec is not None:
        rec["search_loss" if which == "features" else "start_search_loss"] = loss
    _logger.info("finetune: search-part loss %.4f %s", loss,
                 "after the feature stage" if which == "features" else "before training")
    _keep_if_lower(best, loss, 0, which, model)


def _keep_if_lower(best: dict, loss: float, epoch: int, which: str, model: nn.Module) -> None:
    """`model`'s weights (a CPU copy) become `best` when `loss` is lower than its own."""
    if loss < best["loss"]:
        best.update(loss=loss, epoch=epoch, which=which,
                    state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})


def _save(path: Path, epoch: int, net, optimizer, ema, scaler, rec: dict, best: dict) -> None:
    state = {"epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
             "history": rec["history"], "feature_stage": rec["feature_stage"],
             "start_search_loss": rec["start_search_loss"]}
    if "state" in best:
        state["best"] = best
    if ema is not None:
        state["ema"] = ema.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    atomic_write(path, lambda p: torch.save(state, p))


def _resume(path: Path, net, optimizer, ema, scaler, rec: dict, best: dict) -> int:
    from ._errors import ArtifactError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    except Exception as e:  # a damaged checkpoint: torch raises many types
        raise ArtifactError(f"finetune checkpoint {path} is unreadable ({e}); delete it to "
                            "start the finetune again") from e
    rec["history"] = list(state["history"])
    rec["feature_stage"] = state.get("feature_stage")
    rec["start_search_loss"] = state.get("start_search_loss")
    if "best" in state:
        best.update(state["best"])
    rec["resumed_from_epoch"] = int(state["epoch"])
    return int(state["epoch"])
