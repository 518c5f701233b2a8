"""What a run is given, checked and resolved before any work: the teacher and its split, the
candidate ops, the image parts, the target's LUT, the recipe, the work dir and the device.

`prepare` makes a `RunInputs`; every phase step of `compressor.pipeline` (and every ``hant``
command) takes it, together with the artifacts of the phases before.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

import ops_pool
from latency_luts import LUT

from ._errors import CompressorError, RecipeError
from .data import ImagePart, scan_images, split_indices
from .latency import resolve_target
from .recipe import DataCfg, PoolCfg, Recipe, load_recipe
from .runtime import Runtime, resolve_runtime
from .search import check_solver
from .split import TEACHER, Split, format_shape, split
from .store import Store, default_work_dir, digest, tensor_digest
from .teacher import load_teacher, teacher_source

__all__ = ["RunInputs", "prepare", "check_speedup", "candidate_ops", "teacher_key", "arch_key",
           "train_transform_args", "divisor_key"]

_logger = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """Everything the phases need that no phase computes. ``phases`` and ``notes`` collect
    what the steps report (seconds, counts; things the user should know)."""

    teacher: nn.Module
    teacher_name: str
    teacher_args: dict
    split: Split
    candidates: dict[int, list[str]]
    teacher_key: str
    arch_key: str
    parts: dict[str, ImagePart]
    data_cfg: dict
    train_cfg: dict
    data_fp: dict[str, str]
    recipe: Recipe
    store: Store
    lut: LUT
    lut_path: Path | None
    runtime: Runtime
    speedups: list[float]
    progress: bool = True
    sources: dict = field(default_factory=dict)  # teacher weights, data folder names
    phases: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """The speedup whose model is written (the first one asked for)."""
        return self.speedups[0]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.split.input_size)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Times a step into ``phases[name]`` (a dict the step may add figures to)."""
        t0 = time.perf_counter()
        _logger.info("phase %s ...", name)
        rec = self.phases.setdefault(name, {})
        yield rec
        rec["seconds"] = round(time.perf_counter() - t0, 3)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def skipped_files(self) -> list[str]:
        """The unreadable files of every part: met in this run, or by an earlier run over the
        same files (kept in the work dir under each part's fingerprint: a cached phase reads
        no image, so a rerun would otherwise count fewer)."""
        out: set[str] = set()
        for name, part in self.parts.items():
            path = self.store.path("data", f"skipped-{self.data_fp[name]}.json")
            known = set(self.store.read_json(path)) if path.is_file() else set()
            if not part.skipped <= known:
                known |= part.skipped
                self.store.write_json(path, sorted(known))
            out |= known
        return sorted(out)


def prepare(
    model: str | nn.Module,
    data: str | Path,
    target: str | None = "cpu",
    speedup: float | list[float] = 0.5,
    *,
    lut: str | Path | None = None,
    checkpoint: str | Path | None = None,
    recipe: str | Recipe = "default",
    work_dir: str | Path | None = None,
    val_data: str | Path | None = None,
    random_init: bool = False,
    input_size=None,
    progress: bool = True,
    k: int | None = None,
    layers: list[str] | None = None,
) -> RunInputs:
    """Check and resolve a run's inputs; cheap checks first, so a bad input fails before any
    work (CompressorError and its kinds, with one line saying what to do)."""
    values = speedup if isinstance(speedup, (list, tuple)) else [speedup]
    if not values:
        raise CompressorError("--speedup needs at least one value in (0, 1)")
    speedups = [check_speedup(v) for v in values]
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if k is not None:
        recipe = recipe.override("search", k=int(k))
    if recipe.search.method == "ip":
        check_solver(recipe.search.solver)
    runtime = resolve_runtime(recipe.runtime)
    store = Store(work_dir or default_work_dir())
    table, lut_path = resolve_target(target, store, lut=lut)
    data_set = scan_images(data)
    val_set = scan_images(val_data) if val_data is not None else None
    teacher, name, args = load_teacher(model, checkpoint=checkpoint, random_init=random_init)
    t0 = time.perf_counter()
    s = split(teacher, input_size=input_size, model_name=name, layers=layers)
    candidates = candidate_ops(s, recipe.pool)
    t1 = time.perf_counter()
    parts, data_cfg, train_cfg = _parts(teacher, s, data_set, val_set, recipe.data, runtime)
    data_fp = {k: v.fingerprint() for k, v in parts.items()}
    phases = {
        "split": {"layers": len(s.layers), "candidates": sum(map(len, candidates.values())),
                  "seconds": round(t1 - t0, 3)},
        "data": {k: len(v) for k, v in parts.items()}
        | {"seconds": round(time.perf_counter() - t1, 3)},
    }
    return RunInputs(
        teacher=teacher, teacher_name=name, teacher_args=args, split=s, candidates=candidates,
        teacher_key=teacher_key(name, teacher, s), arch_key=arch_key(name, teacher, s),
        parts=parts, data_cfg=data_cfg, train_cfg=train_cfg, data_fp=data_fp, recipe=recipe,
        store=store, lut=table, lut_path=lut_path, runtime=runtime, speedups=speedups,
        progress=progress, phases=phases,
        sources={"teacher": teacher_source(model, teacher, checkpoint),
                 "data": Path(data).resolve().name,
                 "val_data": Path(val_data).resolve().name if val_data else None})


def _parts(teacher, s: Split, data_set, val_set, d: DataCfg, rt: Runtime):
    """The disjoint distill / search / eval parts (eval: ``--val-data`` when given), streamed
    through the teacher's eval transform and the recipe's train transform."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": tuple(s.input_size)}, model=teacher)
    data_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    train_cfg = train_transform_args(data_cfg, d)
    transform = create_transform(**cfg, is_training=False)
    train_transform = create_transform(**train_cfg, is_training=True)

    def part(images, idx) -> ImagePart:
        return ImagePart(images, idx, transform, train_transform, rt.loader_workers,
                         pin_memory=rt.device.type == "cuda")

    holdout = val_set is None
    idx = split_indices(len(data_set), d.distill_fraction, d.search_fraction, d.seed,
                        holdout=holdout)
    parts = {k: part(data_set, v) for k, v in idx.items()}
    if not holdout:
        parts["eval"] = part(val_set, range(len(val_set)))
    return parts, data_cfg, train_cfg


def check_speedup(speedup: float) -> float:
    try:
        s = float(speedup)
    except (TypeError, ValueError):
        raise CompressorError(f"--speedup must be a number in (0, 1), got {speedup!r}") from None
    if not 0.0 < s < 1.0:
        raise CompressorError(
            f"--speedup must be in (0, 1) (student latency / teacher latency; 0.5 = twice as "
            f"fast), got {s}"
        )
    return s


def teacher_key(name: str, teacher: nn.Module, s: Split) -> str:
    """Cache key of a teacher: its name, weights and split."""
    return digest(name, tensor_digest(sorted(teacher.state_dict().items())), s.to_dict())


def arch_key(name: str, teacher: nn.Module, s: Split) -> str:
    """Key of a teacher's architecture (its latency does not depend on its weights)."""
    return digest(name, s.to_dict(), repr(teacher))


def divisor_key() -> tuple:
    """Part of a cache key: a non-default channel divisor builds other widths under the same op
    names (empty for the default, so that existing caches stay valid)."""
    d = ops_pool.get_channel_divisor()
    return () if d == ops_pool.CHANNEL_DIVISOR else (f"channel_divisor={d}",)


def train_transform_args(data_cfg: dict, d: DataCfg) -> dict:
    """Arguments of timm's ``create_transform(is_training=True)``: the teacher's input size,
    interpolation and normalisation with the recipe's augmentation."""
    return {"input_size": tuple(data_cfg["input_size"]), "interpolation":
            data_cfg["interpolation"], "mean": tuple(data_cfg["mean"]),
            "std": tuple(data_cfg["std"]), "scale": tuple(d.train_scale), "hflip": d.train_hflip,
            "color_jitter": d.train_color_jitter or None, "auto_augment": d.train_auto_augment}


def candidate_ops(s: Split, cfg: PoolCfg) -> dict[int, list[str]]:
    """Per layer: ``teacher`` and the pool ops that fit its shapes and the recipe's filters.

    Raises:
        RecipeError: an include pattern matches no registered op (an op named exactly that
            fits none of the layers is logged as a warning: recipes serve several models).
    """
    _check_patterns(cfg)
    out: dict[int, list[str]] = {}
    fitting: set[str] = set()
    for i, layer in enumerate(s.layers):
        valid = ops_pool.valid_ops(layer.in_shape, layer.out_shape)
        fitting.update(valid)
        names = [TEACHER]
        for op in valid:
            if not any(fnmatch.fnmatchcase(op, p) for p in cfg.include):
                continue
            if any(fnmatch.fnmatchcase(op, p) for p in cfg.exclude):
                continue
            names.append(op)
        out[i] = names
    for name in cfg.include:
        if name != TEACHER and not any(c in name for c in "*?[") and name not in fitting:
            sh = ", ".join(f"{i}: {format_shape(x.in_shape)} -> {format_shape(x.out_shape)}"
                           for i, x in enumerate(s.layers[:4]))
            _logger.warning(
                "pool.include names op '%s', which fits none of the %d layers of %s (layer "
                "shapes %s%s); `hant pool list MODEL` shows which ops fit", name, len(s.layers),
                s.model_name, sh, ", ..." if len(s.layers) > 4 else "")
    return out


def _check_patterns(cfg: PoolCfg) -> None:
    """Every include pattern must match some registered op (a typo would silently drop it)."""
    registered = ops_pool.list_ops()
    for pattern in cfg.include:
        if pattern == TEACHER or fnmatch.filter(registered, pattern):
            continue
        close = difflib.get_close_matches(pattern, registered, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"pool.include names '{pattern}', which matches no registered op{hint} "
                          "(`hant pool list MODEL` lists the ops of each layer)")
