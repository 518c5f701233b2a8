"""Re-distillation of the chosen architecture on its own inputs (cross / sequential
distillation): phase 1 fits every op to its teacher layer on the *teacher's* activations, so
once the chosen ops are chained each one sees inputs it was never fitted to and the errors
compound. Here every replaced op, in network order, trains on the student's own activations up
to it, with the teacher layer's output on the same (augmented) view as the target, starting from
its phase-1 weights. One pass per batch trains them all: the student runs forward layer by
layer, each replaced op takes a step on what the student feeds it, and its new output (detached)
feeds the next layer. Teacher layers kept in the student stay frozen in eval mode; the replaced
ops train in train mode, so their BatchNorm statistics follow the student's inputs. (Refitting
the kept teacher layers after the first replaced one the same way was measured and lowers the
held-out top-1: BENCHMARKS.md.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .correction import correct
from .data import ImageSource
from .finetune import _epoch_order
from .recipe import RedistillCfg
from .runtime import Runtime
from .split import TEACHER, Split, TransformedNet

__all__ = ["redistill"]


def redistill(student: TransformedNet, split: Split, images: ImageSource, cfg: RedistillCfg,
              *, runtime: Runtime | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Refit `student`'s replaced ops in place; returns {'epochs', 'steps', 'layers': {index:
    normalised MSE of the last epoch}} and, with `cfg.correct`, 'correction' (see
    :func:`compressor.correction.correct`)."""
    replaced = [i for i, c in enumerate(student.choices) if c != TEACHER]
    rec: dict = {"epochs": cfg.epochs, "steps": 0, "layers": {}}
    trained = [i for i in replaced  # identities have no weights
               if any(True for _ in student.layers[i].parameters())]
    if cfg.epochs > 0 and trained:
        _refit(student, split, images, cfg, runtime or Runtime.cpu(), seed, progress, trained,
               rec)
    if cfg.correct:
        rec["correction"] = correct(student, split, images, augment=cfg.augment,
                                    runtime=runtime, seed=seed + 1, progress=progress)
    return rec


def _refit(student: TransformedNet, split: Split, images: ImageSource, cfg: RedistillCfg,
           runtime: Runtime, seed: int, progress: bool, trained: list[int], rec: dict) -> None:
    """Train the layers `trained` in network order on the student's own activations."""
    from tqdm import tqdm

    net = runtime.module(student)
    stem = runtime.module(split.stem).eval()
    teacher = [runtime.module(layer.module).eval() for layer in split.layers]
    opts = {i: torch.optim.Adam([p for p in net.layers[i].parameters() if p.requires_grad],
                                lr=cfg.lr) for i in trained
            if any(p.requires_grad for p in net.layers[i].parameters())}
    n = len(images)
    bs = max(1, min(cfg.batch_size, n))
    scale: dict[int, float] = {}
    bar = tqdm(total=cfg.epochs * math.ceil(n / bs), desc="re-distill", disable=not progress)
    rng = torch.random.get_rng_state()
    for epoch in range(cfg.epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)
        sums = {i: 0.0 for i in trained}
        seen = 0
        for batch in images.batches(order=_epoch_order(n, bs, seed, epoch), train=cfg.augment,
                                    seed=seed, epoch=epoch):
            x = runtime.input(batch.x)
            with torch.no_grad(), runtime.autocast():
                h = stem(x)
                targets = []
                t = h
                for m in teacher:
                    t = m(t)
                    targets.append(t.float())
            for i, op in enumerate(net.layers):
                if i not in sums:
                    op.eval()
                    with torch.no_grad(), runtime.autocast():
                        h = op(h)
                    continue
                op.train()
                target = targets[i]
                scale.setdefault(i, max(float(target.pow(2).mean()), 1e-6))
                out = op(h.detach().float())  # fp32: no GradScaler here
                loss = F.mse_loss(out.float(), target) / scale[i]
                if i in opts:
                    opts[i].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[i].step()
                sums[i] += loss.item() * len(x)
                h = out.detach()
            seen += len(x)
            rec["steps"] += 1
            bar.update(1)
        rec["layers"] = {i: sums[i] / max(seen, 1) for i in trained}
        bar.set_postfix(mse=f"{sum(rec['layers'].values()) / len(trained):.3f}")
    bar.close()
    torch.random.set_rng_state(rng)
    if net is not student:
        student.load_state_dict(net.state_dict())
    student.eval()
