"""b_ij: per-(layer, op) latency on the target, from a LUT file that grows as ops are measured."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

import latency_luts
from latency_luts import LUT, Target

from .split import TEACHER, Split
from .store import Store

__all__ = ["resolve_target", "layer_latencies", "measure_model", "op_key"]

_logger = logging.getLogger(__name__)


def resolve_target(target: str | Target, store: Store) -> tuple[LUT, Path | None]:
    """A profile name (its LUT lives in the work dir and grows) or a LUT file path (read-only)."""
    if isinstance(target, str) and (target.endswith(".json") or Path(target).is_file()):
        return LUT.load(target), None
    t = latency_luts.get_target(target)
    path = store.path("luts", f"{t.name}.json")
    if path.exists():
        lut = LUT.load(path)
        if lut.target != t:
            _logger.warning("target profile '%s' changed; starting a new LUT", t.name)
            lut = LUT(t)
    else:
        lut = LUT(t)
    return lut, path


def op_key(split: Split, arch_key: str, index: int, op: str) -> str:
    """LUT op name: pool ops are shared across teachers; teacher layers and stem/head are not."""
    if op == TEACHER:
        return f"teacher@{arch_key}/{split.layers[index].name}"
    return op


def measure_model(model: nn.Module, input_size, target: Target) -> latency_luts.Measurement:
    return latency_luts.get_backend(target).measure(model, tuple(input_size))


def layer_latencies(
    split: Split,
    arch_key: str,
    candidates: dict[int, list[str]],
    lut: LUT,
    lut_path: Path | None,
    progress: bool = True,
) -> tuple[list[dict[str, float]], float, float]:
    """Fill `lut` with every missing entry; return (b[i][op], stem ms, head ms)."""
    from tqdm import tqdm

    stem_out = split.layers[0].in_shape
    head_in = split.layers[-1].out_shape
    items = [(f"stem@{arch_key}", split.input_size, stem_out, lambda: split.stem)]
    items.append((f"head@{arch_key}", head_in, split.output_shape, lambda: split.head))
    for i, ops in candidates.items():
        layer = split.layers[i]
        for op in ops:
            items.append((op_key(split, arch_key, i, op), layer.in_shape, layer.out_shape,
                          (lambda i=i, op=op: split.build_op(i, op))))
    missing = [it for it in items if (it[0], it[1], it[2]) not in lut]
    if missing:
        if lut_path is None:
            first = missing[0]
            raise latency_luts.LutError(
                f"the LUT has no entry for op '{first[0]}' at input {tuple(first[1])}; it was "
                "built for another model or pool. Build one for this model with "
                "`hant lut build MODEL --target NAME -o FILE`"
            )
        backend = latency_luts.get_backend(lut.target)
        lut.fingerprint = latency_luts.environment_fingerprint(lut.target, backend.fingerprint())
        bar = tqdm(missing, desc=f"latency LUT ({lut.target.name})", unit="op",
                   disable=not progress)
        for n, (name, in_shape, out_shape, make) in enumerate(bar):
            m = backend.measure(make(), tuple(in_shape))
            lut.set(name, in_shape, out_shape, m.ms, m.spread_ms, m.runs)
            if n % 25 == 24:
                lut.save(lut_path)
        lut.save(lut_path)
    stem_ms = lut.get(*items[0][:3])
    head_ms = lut.get(*items[1][:3])
    b: list[dict[str, float]] = [{} for _ in split.layers]
    for i, ops in candidates.items():
        layer = split.layers[i]
        for op in ops:
            b[i][op] = lut.get(op_key(split, arch_key, i, op), layer.in_shape, layer.out_shape)
    return b, stem_ms, head_ms
