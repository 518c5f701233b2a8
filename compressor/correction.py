"""Closed-form correction of the replaced ops (as few-sample knowledge distillation does): per
replaced op, in network order, the 1x1 linear map (C x C and a bias) that best turns the op's
last BatchNorm output into what the teacher layer's output needs, least squares on the
student's own activations over the distill images, folded into that op's last convolution and
BatchNorm, so that it costs no latency.

An op qualifies when its branch ends in a dense ``Conv2d`` and a ``BatchNorm2d`` (every
inverted-residual and dense-block family of `ops_pool` does); with a skip connection
(``ops_pool.Residual``: ``x + body(x)``) the branch is fitted to the teacher's output less the
skip. The folded BatchNorm is given the statistics of its new input, so that it behaves the
same in train mode (the finetune) as in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

import ops_pool

from .data import ImageSource
from .runtime import Runtime
from .split import TEACHER, Split, TransformedNet

__all__ = ["correct", "foldable_tail", "fold_linear"]


def foldable_tail(op: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d, bool] | None:
    """(last conv, last BatchNorm, whether a skip adds the op's input) of an op whose branch
    ends in a dense convolution and a BatchNorm; None otherwise."""
    residual = isinstance(op, ops_pool.Residual)
    branch = op.body if residual else op
    if not isinstance(branch, nn.Sequential) or len(branch) < 2:
        return None
    conv, bn = branch[-2], branch[-1]
    if (not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.bias is not None
            or not isinstance(bn, nn.BatchNorm2d) or not bn.affine or not bn.track_running_stats
            or bn.num_features != conv.out_channels):
        return None
    return conv, bn, residual


@torch.no_grad()
def fold_linear(conv: nn.Conv2d, bn: nn.BatchNorm2d, w: torch.Tensor, b: torch.Tensor,
                mean_y: torch.Tensor, cov_y: torch.Tensor) -> None:
    """Make ``bn(conv(x))`` compute ``w @ y + b`` (per pixel), where y is what it computed
    before; `mean_y`, `cov_y`: the mean and covariance of y over the data, from which the new
    BatchNorm statistics follow (exact in eval mode; in train mode the batch statistics match
    them on that data)."""
    dt = conv.weight.dtype
    w, b = w.double(), b.double()
    mean_y, cov_y = mean_y.double(), cov_y.double()
    gamma, beta = bn.weight.double(), bn.bias.double()
    mu, var = bn.running_mean.double(), bn.running_var.double()
    s = gamma / torch.sqrt(var + bn.eps)
    a = w * s[None, :]  # w @ diag(s)
    shape = conv.weight.shape
    conv.weight.copy_((a @ conv.weight.double().reshape(shape[0], -1)).reshape(shape).to(dt))
    shift = w @ (beta - s * mu) + b  # what the old BN's affine part adds, mapped by w
    m0 = w @ (mean_y - beta + s * mu)  # the new conv output's mean over the data
    v0 = torch.einsum("ck,kl,cl->c", w, cov_y, w).clamp_min(0.0)  # and its variance
    bn.running_mean.copy_(m0.to(dt))
    bn.running_var.copy_(v0.to(dt))
    bn.weight.copy_(torch.sqrt(v0 + bn.eps).to(dt))
    bn.bias.copy_((m0 + shift).to(dt))


class _Moments:
    """Sums over pixels of y, r and their products (float64), for the least squares fit."""

    def __init__(self, c: int, device):
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.y, self.r = torch.zeros(c, **kw), torch.zeros(c, **kw)
        self.yy, self.yr = torch.zeros(c, c, **kw), torch.zeros(c, c, **kw)
        self.rr = self.tt = 0.0

    def add(self, y: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> None:
        c = y.shape[1]
        y = y.transpose(0, 1).reshape(c, -1).double()
        r = r.transpose(0, 1).reshape(c, -1).double()
        self.n += y.shape[1]
        self.y += y.sum(1)
        self.r += r.sum(1)
        self.yy += y @ y.T
        self.yr += y @ r.T
        self.rr += float(r.pow(2).sum())
        self.tt += float(t.double().pow(2).sum())

    def solve(self, ridge: float) -> dict:
        n, c = self.n, len(self.y)
        my, mr = self.y / n, self.r / n
        cyy = self.yy / n - torch.outer(my, my)
        cyr = self.yr / n - torch.outer(my, mr)
        reg = ridge * float(torch.trace(cyy)) / c
        m = torch.linalg.solve(cyy + reg * torch.eye(c, dtype=cyy.dtype, device=cyy.device),
                               cyr)
        w = m.T
        b = mr - w @ my
        scale = max(self.tt / (n * c), 1e-12)
        # mean squared error per element, before (w = I, b = 0) and after
        err_rr = self.rr / n
        before = (torch.trace(self.yy) / n - 2 * torch.trace(self.yr) / n + err_rr) / c
        crr = err_rr - float(mr @ mr)
        after = (crr - 2 * torch.trace(w @ cyr) + torch.trace(w @ cyy @ w.T)) / c
        return {"w": w, "b": b, "mean_y": my, "cov_y": cyy, "before": float(before) / scale,
                "after": float(after) / scale}


def correct(student: TransformedNet, split: Split, images: ImageSource, *,
            ridge: float = 1e-3, augment: bool = True, runtime: Runtime | None = None,
            seed: int = 0, progress: bool = True) -> dict:
    """Fit and fold the correction of every qualifying replaced op of `student`, in network
    order (each on the student's activations with the earlier corrections in place), over one
    pass of `images` per op. Returns {'layers': {index: {'before', 'after'}}} (normalised MSE
    of the op's output against the teacher layer's, on the fitted data) and 'skipped' (replaced
    layers whose op has no dense conv + BatchNorm tail, identities included)."""
    from tqdm import tqdm

    runtime = runtime or Runtime.cpu()
    student.eval()
    net = runtime.module(student).eval()
    stem = runtime.module(split.stem).eval()
    teacher = [runtime.module(layer.module).eval() for layer in split.layers]
    rec: dict = {"layers": {}, "skipped": []}
    todo = []
    for i, choice in enumerate(student.choices):
        if choice == TEACHER:
            continue
        tail = foldable_tail(net.layers[i])
        if tail is None:
            rec["skipped"].append(i)
        else:
            todo.append((i, tail))
    bar = tqdm(total=len(todo), desc="correct", disable=not progress)
    for i, (conv, bn, residual) in todo:
        moments = _Moments(bn.num_features, runtime.device)
        captured: list[torch.Tensor] = []
        hook = bn.register_forward_hook(lambda m, inp, out, sink=captured: sink.append(out))
        try:
            for batch in images.batches(32, train=augment, seed=seed, epoch=0):
                captured.clear()
                with torch.no_grad(), runtime.autocast():
                    x = runtime.input(batch.x)
                    h = t = stem(x)
                    for m in teacher[: i + 1]:
                        t = m(t)
                    for layer in net.layers[:i]:
                        h = layer(h)
                    net.layers[i](h)
                y = captured[-1].float()
                t = t.float()
                moments.add(y, t - h.float() if residual else t, t)
        finally:
            hook.remove()
        fit = moments.solve(ridge)
        fold_linear(conv, bn, fit["w"], fit["b"], fit["mean_y"], fit["cov_y"])
        rec["layers"][i] = {"before": fit["before"], "after": fit["after"]}
        bar.update(1)
    bar.close()
    if net is not student:
        student.load_state_dict(net.state_dict())
    return rec
