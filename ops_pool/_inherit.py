"""Start an op from the teacher layer's weights where their structures align (HANT issue 13).

A conv op and a teacher block are read as chains of ``conv [+ norm]`` steps in module order
(squeeze-excitation gates aside). When the chains have the same length and every step pair is
compatible, the op takes the teacher's weights step by step:

- the same structure: a copy (the op computes the teacher's function, up to its activations);
- fewer hidden channels (a smaller expansion or width): the teacher's most important ones, by
  the norm of the next dense conv's input weights times the scale of the norm before it (as
  channel pruning ranks them);
- more hidden channels: the teacher's in the first ones; the rest keep their init and get zero
  weights in the next conv, so the function is unchanged;
- a smaller kernel: the centre of the teacher's; a larger one: the teacher's, zero-padded;
- a dense conv where the teacher has a depthwise one: the depthwise kernels on the diagonal
  (the same function);
- a squeeze-excitation gate the teacher lacks: a constant gate (zero weights) whose value the
  next conv divides out, so the op starts as if the gate were absent and can still learn it.

Anything else (other step counts, a depthwise op step where the teacher is dense, strides or
norms that differ, a teacher gate the op lacks) is left to the op's own init: :func:`inherit`
returns an empty string and changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["inherit"]

_GATE_BIAS = 3.0  # constant gate sigmoid(3) ~ 0.95 at init: far from saturation, so it learns


@dataclass
class _Step:
    conv: nn.Conv2d
    norm: nn.BatchNorm2d | None
    gate_before: nn.Module | None = None  # an SE gate between the previous step and this one

    @property
    def depthwise(self) -> bool:
        c = self.conv
        return c.groups > 1 and c.groups == c.in_channels == c.out_channels

    @property
    def dense(self) -> bool:
        return self.conv.groups == 1


def _is_gate(m: nn.Module) -> bool:
    return hasattr(m, "conv_reduce") and hasattr(m, "conv_expand")


def _chain(module: nn.Module) -> list[_Step] | None:
    """The conv(+norm) steps of ``module`` in order, or None when it has other parametric parts."""
    inside: set[int] = set()
    steps: list[_Step] = []
    gate = None
    pending: nn.Conv2d | None = None
    for m in module.modules():
        if id(m) in inside:
            continue
        if _is_gate(m):
            inside.update(id(s) for s in m.modules())
            if pending is not None:
                steps.append(_Step(pending, None, gate))
                pending, gate = None, None
            gate = m
            continue
        if isinstance(m, nn.Conv2d):
            if pending is not None:
                steps.append(_Step(pending, None, gate))
                gate = None
            pending = m
        elif isinstance(m, nn.BatchNorm2d):
            if pending is None:
                return None  # a norm not right after a conv
            steps.append(_Step(pending, m, gate))
            pending, gate = None, None
        elif isinstance(m, (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)):
            return None
    if pending is not None:
        steps.append(_Step(pending, None, gate))
        gate = None
    if gate is not None:
        return None  # a gate after the last conv
    return steps or None


def _skip(module: nn.Module) -> bool | None:
    skip = getattr(module, "has_skip", None)
    if skip is not None:
        return bool(skip)
    from ._layers import Residual
    return True if isinstance(module, Residual) else None


def _importance(steps: list[_Step], i: int) -> torch.Tensor:
    """How much each output channel of step ``i`` matters to the next dense step."""
    scale = torch.ones(steps[i].conv.out_channels)
    j = i
    while True:
        norm = steps[j].norm
        if norm is not None and norm.weight is not None:
            s = norm.weight.detach().abs() / torch.sqrt(norm.running_var + norm.eps)
            scale = s if j == i else scale * s  # through depthwise steps channel c stays c
        j += 1
        if j >= len(steps) or not steps[j].depthwise:
            break
        w = steps[j].conv.weight.detach()
        scale = scale * w.flatten(1).norm(dim=1)
    if j < len(steps):
        w = steps[j].conv.weight.detach()
        scale = scale * w.transpose(0, 1).flatten(1).norm(dim=1)
    return scale.float()


def _pad_before(conv: nn.Conv2d, size: int | None) -> int:
    """Zero rows the conv adds before its input: its padding, or for a TF-"same" conv
    (timm's ``Conv2dSame``, which pads on the fly, more after than before) half the total the
    input `size` needs (an even size when unknown)."""
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if isinstance(conv.padding, tuple) and (conv.padding[0] or type(conv).__name__ not in (
            "Conv2dSame", "Conv2dSameExport")):
        return int(conv.padding[0])
    size = size if size is not None else 2 * s * 8
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0) // 2


def _kernel(w: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """The last two dims of ``w`` placed in a ``k x k`` kernel at ``offset`` (tap j of the new
    kernel is tap j - offset of ``w``; taps outside either are dropped or zero)."""
    kt = w.shape[-1]
    out = w.new_zeros(*w.shape[:-2], k, k)
    lo, hi = max(0, offset), min(k, kt + offset)
    if lo < hi:
        out[..., lo:hi, lo:hi] = w[..., lo - offset:hi - offset, lo - offset:hi - offset]
    return out


def _compatible(o: _Step, t: _Step) -> bool:
    oc, tc = o.conv, t.conv
    if oc.stride != tc.stride or oc.dilation != (1, 1) or tc.dilation != (1, 1):
        return False
    if oc.kernel_size[0] != oc.kernel_size[1] or tc.kernel_size[0] != tc.kernel_size[1]:
        return False
    if oc.kernel_size[0] % 2 != tc.kernel_size[0] % 2:
        return False
    if (o.norm is None) != (t.norm is None) or (oc.bias is None) != (tc.bias is None):
        return False
    if o.gate_before is None and t.gate_before is not None:
        return False
    if o.depthwise:
        return t.depthwise
    return o.dense and (t.dense or (t.depthwise and oc.in_channels == oc.out_channels))


def _select(imp: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the teacher channels behind ``n`` op channels (-1: a channel of its own)."""
    if n <= len(imp):
        return torch.sort(torch.topk(imp, n).indices).values
    return torch.cat([torch.arange(len(imp)), torch.full((n - len(imp),), -1)])


def _plan(op_steps: list[_Step], t_steps: list[_Step]) -> list[torch.Tensor] | None:
    """The teacher channel behind each output channel of every op step, or None."""
    if len(op_steps) != len(t_steps) or not all(map(_compatible, op_steps, t_steps)):
        return None
    sel_in = torch.arange(op_steps[0].conv.in_channels)
    if op_steps[0].conv.in_channels != t_steps[0].conv.in_channels:
        return None
    plans = []
    for i, (o, t) in enumerate(zip(op_steps, t_steps)):
        n = o.conv.out_channels
        if o.depthwise or t.depthwise:
            # channel c stays c; extra op channels (-1) keep their init, the next dense conv
            # ignores them, except where a dense op conv takes the teacher's depthwise one
            if n != len(sel_in) or (not o.depthwise and (sel_in < 0).any()):
                return None
            sel = sel_in
        elif i == len(op_steps) - 1:
            if n != t.conv.out_channels:
                return None
            sel = torch.arange(n)
        else:
            sel = _select(_importance(t_steps, i), n)
        plans.append(sel)
        sel_in = sel
    return plans


@torch.no_grad()
def _copy_norm(o: nn.BatchNorm2d, t: nn.BatchNorm2d, sel: torch.Tensor) -> None:
    keep = sel >= 0
    src = sel[keep]
    if o.weight is not None and t.weight is not None:
        o.weight[keep] = t.weight[src].to(o.weight)
        o.bias[keep] = t.bias[src].to(o.bias)
    o.running_mean[keep] = t.running_mean[src].to(o.running_mean)
    # the op's eps may differ from the teacher's: keep var + eps, the normaliser, the same
    o.running_var[keep] = (t.running_var[src] + t.eps - o.eps).clamp_min(0).to(o.running_var)


@torch.no_grad()
def _copy_gate(o: nn.Module, t: nn.Module, sel: torch.Tensor) -> float:
    """Copy the teacher gate when widths agree; else a constant gate. Returns what the next
    conv must divide by (1 after a copy)."""
    oc, tc = o.conv_expand, t.conv_expand if t is not None else None
    if (t is not None and (sel >= 0).all() and o.conv_reduce.out_channels
            == t.conv_reduce.out_channels and o.conv_reduce.in_channels == len(sel)):
        o.conv_reduce.weight.copy_(t.conv_reduce.weight[:, sel])
        o.conv_reduce.bias.copy_(t.conv_reduce.bias)
        oc.weight.copy_(tc.weight[sel])
        oc.bias.copy_(tc.bias[sel])
        return 1.0
    oc.weight.zero_()
    oc.bias.fill_(_GATE_BIAS)
    return float(torch.sigmoid(torch.tensor(_GATE_BIAS)))


@torch.no_grad()
def _apply(op_steps: list[_Step], t_steps: list[_Step], plans: list[torch.Tensor],
           size: int | None, align: bool) -> None:
    sel_in = torch.arange(op_steps[0].conv.in_channels)
    for o, t, sel in zip(op_steps, t_steps, plans):
        # align: the same input pixel under each conv's own padding; else centre on centre
        ko, kt = o.conv.kernel_size[0], t.conv.kernel_size[0]
        offset = (_pad_before(o.conv, size) - _pad_before(t.conv, size) if align
                  else (ko - kt) // 2)
        if size is not None:
            size = math.ceil(size / o.conv.stride[0])
        divide = 1.0
        if o.gate_before is not None:
            divide = _copy_gate(o.gate_before, t.gate_before, sel_in)
        ow, tw = o.conv.weight, t.conv.weight
        k = ow.shape[-1]
        keep_out, keep_in = sel >= 0, sel_in >= 0
        if o.dense and t.depthwise:
            new = torch.zeros_like(ow)
            kern = _kernel(tw[sel, 0], k, offset)  # (n, k, k)
            idx = torch.arange(len(sel))
            new[idx, idx] = kern.to(ow)
        else:
            new = ow.clone()
            src = tw[sel.clamp_min(0)]
            if o.dense:
                src = src[:, sel_in.clamp_min(0)]
                new[:, ~keep_in] = 0  # extra input channels start unused
            src = _kernel(src, k, offset).to(ow)
            if o.dense:
                new[keep_out[:, None] & keep_in[None, :]] = src[keep_out][:, keep_in].flatten(
                    0, 1)
            else:
                new[keep_out] = src[keep_out]
        ow.copy_(new / divide)
        if o.conv.bias is not None:
            o.conv.bias[keep_out] = t.conv.bias[sel[keep_out]].to(o.conv.bias)
        if o.norm is not None:
            _copy_norm(o.norm, t.norm, sel)
        sel_in = sel


def inherit(op: nn.Module, source: nn.Module, in_shape: tuple[int, ...] | None = None,
            align: bool = True) -> str:
    """Initialise ``op`` from ``source`` (the teacher layer it replaces) where they align.

    ``in_shape`` (the layer's ``(C, H, W)``) places the kernels exactly under a teacher conv
    that pads TF-style, unevenly (timm's ``Conv2dSame`` in the ``tf_`` models): with a stride
    of 2 its taps sit one pixel off a symmetric conv's, so a kernel of the same size loses a
    row and a column, and a larger one holds it exactly. Without it an even size is assumed.
    ``align=False`` puts the kernels centre on centre instead (all taps kept, one pixel off
    there), which can start closer for a kernel of the same size.

    Returns a short description of what was inherited, or ``""`` when their structures do not
    align (``op`` is then left as it was).

    Example:
        >>> import ops_pool, torch
        >>> teacher = ops_pool.build("efn_3x3_e3_se1.00", (16, 8, 8), (16, 8, 8)).eval()
        >>> _ = [torch.nn.init.normal_(p) for p in teacher.parameters()]
        >>> op = ops_pool.build("efn_3x3_e3_se1.00", (16, 8, 8), (16, 8, 8)).eval()
        >>> inherit(op, teacher)
        'copy'
        >>> x = torch.randn(2, 16, 8, 8)
        >>> bool(torch.allclose(op(x), teacher(x)))
        True
    """
    op_steps, t_steps = _chain(op), _chain(source)
    if op_steps is None or t_steps is None:
        return ""
    op_skip, t_skip = _skip(op), _skip(source)
    if t_skip is not None and bool(op_skip) != t_skip:
        return ""
    plans = _plan(op_steps, t_steps)
    if plans is None:
        return ""
    _apply(op_steps, t_steps, plans, None if in_shape is None else int(in_shape[-1]), align)
    notes = []
    for i, (o, t) in enumerate(zip(op_steps, t_steps)):
        if i < len(op_steps) - 1 and o.conv.out_channels != t.conv.out_channels and not (
                o.depthwise or t.depthwise):
            notes.append(f"{t.conv.out_channels}->{o.conv.out_channels} ch")
        if o.conv.kernel_size != t.conv.kernel_size:
            notes.append(f"{t.conv.kernel_size[0]}x{t.conv.kernel_size[0]}->"
                         f"{o.conv.kernel_size[0]}x{o.conv.kernel_size[0]}")
        if o.dense and t.depthwise:
            notes.append("dw->dense")
        if o.gate_before is not None and t.gate_before is None:
            notes.append("constant gate")
    return ", ".join(dict.fromkeys(notes)) or "copy"
