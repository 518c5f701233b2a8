"""The whole pipeline as one object whose phases run in order, each cached in the work dir.

``compress()`` runs every phase; the ``hant`` CLI runs them one at a time on the same object.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import ops_pool

from ._errors import CompressorError, InfeasibleError, RecipeError, SearchError
from .data import ImagePart, ImageSource, scan_images, split_indices
from .distill import OpResult, distill, load_op, load_weights
from .evaluate import evaluate, mean_loss, predict
from .evolution import nsga2
from .finetune import finetune
from .fitness import Fitness, fitness
from .latency import (
    can_measure,
    layer_latencies,
    measure_model,
    missing_entries,
    resolve_target,
)
from .recipe import DataCfg, PoolCfg, Recipe, load_recipe
from .runtime import resolve_runtime
from .search import Solution, check_solver, kendall_tau, min_latency, solve
from .split import TEACHER, Split, format_shape, split
from .store import Store, default_work_dir, digest, tensor_digest
from .teacher import load_teacher

__all__ = ["Run", "Result", "compress", "check_speedup", "candidate_ops", "teacher_key",
           "arch_key"]

_logger = logging.getLogger(__name__)


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


@dataclass
class Result:
    """What `compress` returns: the student, its report, and how to write it out."""

    model: nn.Module
    report: dict
    teacher_name: str
    teacher_args: dict = field(default_factory=dict)
    input_size: tuple = (3, 224, 224)

    def save_pretrained(self, out_dir, onnx: bool = True) -> Path:
        from .publish import save_pretrained

        return save_pretrained(
            self.model, out_dir, teacher_name=self.teacher_name, teacher_args=self.teacher_args,
            choices=self.report["student"]["choices"], input_size=self.input_size,
            report=self.report, onnx=onnx,
        )

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    api=None) -> str:
        import tempfile

        from .publish import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_to_hub(folder, repo_id, token=token, private=private, api=api)


def teacher_key(name: str, teacher: nn.Module, s: Split) -> str:
    """Cache key of a teacher: its name, weights and split."""
    return digest(name, tensor_digest(sorted(teacher.state_dict().items())), s.to_dict())


def arch_key(name: str, teacher: nn.Module, s: Split) -> str:
    """Key of a teacher's architecture (its latency does not depend on its weights)."""
    return digest(name, s.to_dict(), repr(teacher))


def _divisor_key() -> tuple:
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
    import difflib

    registered = ops_pool.list_ops()
    for pattern in cfg.include:
        if pattern == TEACHER or fnmatch.filter(registered, pattern):
            continue
        close = difflib.get_close_matches(pattern, registered, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"pool.include names '{pattern}', which matches no registered op{hint} "
                          "(`hant pool list MODEL` lists the ops of each layer)")


class Run:
    """One compression run. Phases: split, lut, distill, fitness, search, finetune, evaluate.

    Example:
        >>> run = Run("test_efficientnet", data="imgs/", target="cpu", speedup=0.5,
        ...           random_init=True)  # doctest: +SKIP
        >>> result = run.all()  # doctest: +SKIP
    """

    def __init__(
        self,
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
    ):
        # cheap checks first, so a bad input fails before any work
        values = speedup if isinstance(speedup, (list, tuple)) else [speedup]
        if not values:
            raise CompressorError("--speedup needs at least one value in (0, 1)")
        self.speedups = [check_speedup(v) for v in values]
        self.speedup = self.speedups[0]  # the model written out is the first one's
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if k is not None:
            self.recipe = self.recipe.override("search", k=int(k))
        if self.recipe.search.method == "ip":
            check_solver(self.recipe.search.solver)
        self.runtime = resolve_runtime(self.recipe.runtime)
        self.store = Store(work_dir or default_work_dir())
        self.lut, self.lut_path = resolve_target(target, self.store, lut=lut)
        self.data_set = scan_images(data)
        self.val_set = scan_images(val_data) if val_data is not None else None
        self.teacher, self.teacher_name, self.teacher_args = load_teacher(
            model, checkpoint=checkpoint, random_init=random_init
        )
        self.input_size = input_size
        self.progress = progress
        self.phases: dict[str, dict] = {}
        self._split: Split | None = None
        self.parts: dict[str, ImagePart] | None = None
        self.notes: list[str] = []

    # ---------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _phase(self, name: str):
        t0 = time.perf_counter()
        _logger.info("phase %s ...", name)
        rec = self.phases.setdefault(name, {})
        yield rec
        rec["seconds"] = round(time.perf_counter() - t0, 3)

    # ---------------------------------------------------------------- phases
    def split(self) -> Split:
        if self._split is not None:
            return self._split
        with self._phase("split") as rec:
            s = split(self.teacher, input_size=self.input_size, model_name=self.teacher_name)
            self._split = s
            self.input_size = s.input_size
            self.teacher_key = teacher_key(self.teacher_name, self.teacher, s)
            self.arch_key = arch_key(self.teacher_name, self.teacher, s)
            rec["layers"] = len(s.layers)
            self.candidates = candidate_ops(s, self.recipe.pool)
            rec["candidates"] = sum(len(v) for v in self.candidates.values())
        return s

    def _images(self) -> dict[str, ImagePart]:
        """The run's disjoint distill / search / eval parts, streamed from disk."""
        if self.parts is not None:
            return self.parts
        from timm.data import create_transform, resolve_data_config

        s = self.split()
        d = self.recipe.data
        with self._phase("data") as rec:
            cfg = resolve_data_config({"input_size": tuple(s.input_size)}, model=self.teacher)
            transform = create_transform(**cfg, is_training=False)
            train_transform = create_transform(**train_transform_args(cfg, d), is_training=True)
            self.data_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
            self.train_cfg = train_transform_args(self.data_cfg, d)
            rt = self.runtime

            def part(images, idx) -> ImagePart:
                return ImagePart(images, idx, transform, train_transform, rt.loader_workers,
                                 pin_memory=rt.device.type == "cuda")

            n = len(self.data_set)
            holdout = self.val_set is None
            idx = split_indices(n, d.distill_fraction, d.search_fraction, d.seed,
                                holdout=holdout)
            parts = {k: part(self.data_set, v) for k, v in idx.items()}
            if not holdout:
                parts["eval"] = part(self.val_set, range(len(self.val_set)))
            self.parts = parts
            self.data_fp = {k: v.fingerprint() for k, v in parts.items()}
            rec.update({k: len(v) for k, v in parts.items()})
        return parts

    def _skipped(self) -> list[str]:
        """The unreadable files met so far, in every part."""
        return sorted(set().union(*(p.skipped for p in (self.parts or {}).values())))

    def luts(self):
        """b_ij for every candidate, stem and head; checks the speedup is reachable."""
        s = self.split()
        with self._phase("lut") as rec:
            n_before = len(self.lut.entries)
            self.b, self.stem_ms, self.head_ms = layer_latencies(
                s, self.arch_key, self.candidates, self.lut, self.lut_path, self.progress
            )
            rec["measured_entries"] = len(self.lut.entries) - n_before
            rec["cached"] = rec["measured_entries"] == 0
            rec["estimated"] = self.lut.estimated
            if self.lut.estimated and not any("roofline" in n for n in self.notes):
                t = self.lut.target
                self.notes.append(
                    f"target '{t.name}' ({t.hardware or t.device}) is not on this machine: its "
                    "latencies are roofline estimates, and the student is not measured end to end")
            self.teacher_pred = self.stem_ms + self.head_ms + sum(b[TEACHER] for b in self.b)
            self.min_pred = self.stem_ms + self.head_ms + min_latency(self.b)
            rec["min_speedup"] = round(self.min_pred / self.teacher_pred, 4)
        if self.speedup * self.teacher_pred < self.min_pred:
            raise InfeasibleError(
                f"speedup {self.speedup} is out of reach for {self.teacher_name} on target "
                f"'{self.lut.target.name}': even the fastest op in every layer (identity where "
                f"the shapes allow) gives {self.min_pred / self.teacher_pred:.3f}; ask for a "
                f"speedup of at least {self.min_pred / self.teacher_pred:.3f}"
            )
        return self.b

    def distill(self) -> dict[tuple[int, str], OpResult]:
        s = self.split()
        parts = self._images()
        cfg = self.recipe.distill
        # keyed by what decides the weights, not by the schedule (group size, cache, device)
        key = digest(cfg.result_dict(), self.data_fp["distill"], self.data_cfg,
                     self.train_cfg if cfg.augment else None, *_divisor_key())
        self.distill_root = self.store.path(self.teacher_key, "distill", key)
        # HANT's latency prefilter drops ops slower than the teacher's layer: they are never
        # trained (the same ops whether `hant distill` or `compress` runs this phase). Under
        # torchrun the ranks cannot share one measurement, so a LUT that still lacks entries
        # is not measured here and every candidate trains (the search filters them later).
        train = self.candidates
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        if not hasattr(self, "b") and ranks > 1 and missing_entries(
                s, self.arch_key, self.candidates, self.lut):
            _logger.info("distill under torchrun with an incomplete LUT: training every "
                         "candidate (build the LUT first, `hant lut build`, to skip the ops "
                         "slower than the teacher's layer)")
        else:
            if not hasattr(self, "b"):
                self.luts()
            train = {i: [op for op in ops if self.b[i][op] <= self.b[i][TEACHER]]
                     for i, ops in self.candidates.items()}
        with self._phase("distill") as rec:
            todo = sum(len(v) - 1 for v in train.values())
            self.distilled = distill(
                s, train, parts["distill"], cfg, self.store, self.distill_root, self.progress,
                runtime=self.runtime,
            )
            failed = [r.to_dict() for r in self.distilled.values() if r.status != "ok"]
            rec.update(ops=todo, skipped_slower_than_teacher=sum(
                len(v) for v in self.candidates.values()) - todo - len(train), failed=len(failed))
            self.failed_ops = failed
        return self.distilled

    def _ops(self, names: dict[int, list[str]]) -> dict[int, dict[str, nn.Module]]:
        s = self.split()
        return {
            i: {op: load_op(s, self.store, self.distill_root, i, op).eval() for op in ops}
            for i, ops in names.items()
        }

    def fitness(self) -> Fitness:
        s = self.split()
        parts = self._images()
        if not hasattr(self, "distilled"):
            self.distill()
        ok = {
            i: [op for op in ops if op == TEACHER or (
                (i, op) in self.distilled and self.distilled[(i, op)].status == "ok")]
            for i, ops in self.candidates.items()
        }
        key = digest(self.distill_root.name, self.data_fp["search"], ok)
        path = self.store.path(self.teacher_key, "fitness", f"{key}.json")
        with self._phase("fitness") as rec:
            if path.exists():
                self.fit = Fitness.from_dict(self.store.read_json(path))
                rec["cached"] = True
            else:
                self.fit = fitness(s, self._ops(ok), parts["search"],
                                   self.recipe.data.batch_size, self.progress,
                                   runtime=self.runtime)
                self.store.write_json(path, self.fit.to_dict())
                rec["cached"] = False
            rec["images"] = self.fit.images
        return self.fit

    def _prefilter(self):
        """HANT's prefilter: drop ops slower than the teacher's layer or losing more than
        `max_accuracy_drop` points. The accuracy part is skipped (and reported) if it would make
        the requested budget infeasible."""
        fit = self.fit
        by_latency = [
            {op: a for op, a in fit.a[i].items() if self.b[i][op] <= self.b[i][TEACHER]}
            for i in range(len(fit.a))
        ]
        slower = sum(
            1 for i, ops in self.candidates.items() for op in ops
            if self.b[i][op] > self.b[i][TEACHER]
        )
        dominated = 0
        if self.recipe.fitness.donnav2_filter:
            by_latency, dominated = self._donnav2(by_latency)
        limit = self.recipe.fitness.max_accuracy_drop
        by_acc = [
            {op: a for op, a in layer.items() if fit.acc_drop[i][op] <= limit}
            for i, layer in enumerate(by_latency)
        ]
        budget = self.speedup * self.teacher_pred - self.stem_ms - self.head_ms
        bsub = [{op: self.b[i][op] for op in layer} for i, layer in enumerate(by_acc)]
        info = {
            "candidates": sum(len(x) for x in self.candidates.values()),
            "removed_slower_than_teacher": slower,
            "removed_failed_distillation": len(self.failed_ops),
            "removed_dominated_donnav2": dominated,
            "removed_accuracy_drop": sum(len(x) for x in by_latency)
            - sum(len(x) for x in by_acc),
            "accuracy_filter_applied": True,
        }
        keep = by_acc
        if min_latency(bsub) > budget:
            keep = by_latency
            info["accuracy_filter_applied"] = False
            info["removed_accuracy_drop"] = 0
            note = (f"accuracy prefilter (>{limit} points) skipped: it would leave no "
                    "architecture within the budget")
            self.notes.append(note)
            _logger.warning(note)
        info["kept"] = sum(len(x) for x in keep)
        return keep, info

    def _donnav2(self, layers: list[dict[str, float]]) -> tuple[list[dict[str, float]], int]:
        """DONNAv2's filter: drop an op when another op of the same layer is at least as good in
        distillation loss and latency and better in one (the teacher counts with loss 0)."""
        out, removed = [], 0
        for i, layer in enumerate(layers):
            loss = {op: 0.0 if op == TEACHER else self.distilled[(i, op)].loss for op in layer}
            keep = {}
            for op, a in layer.items():
                if any(
                    loss[o] <= loss[op] and self.b[i][o] <= self.b[i][op]
                    and (loss[o] < loss[op] or self.b[i][o] < self.b[i][op])
                    for o in layer if o != op
                ):
                    removed += 1
                else:
                    keep[op] = a
            out.append(keep)
        return out, removed

    def search(self) -> Solution:
        self.split()
        parts = self._images()
        if not hasattr(self, "b"):
            self.luts()
        if not hasattr(self, "fit"):
            self.fitness()
        cfg = self.recipe.search
        with self._phase("search") as rec:
            a, pre = self._prefilter()
            b = [{op: self.b[i][op] for op in layer} for i, layer in enumerate(a)]
            n_eval = min(self.recipe.data.candidate_eval_images, len(parts["search"]))
            cand = parts["search"].subset(range(n_eval)).decode()  # ranked many times
            t_logits = predict(self.teacher, cand, self.runtime)
            budget = self.speedup * self.teacher_pred - self.stem_ms - self.head_ms
            rounds = []
            best = None
            for _ in range(max(1, cfg.verify_rounds)):
                sols, losses, tau, j = self._solve_and_rank(a, b, budget, cand, t_logits)
                best = sols[j]
                pred = self.stem_ms + self.head_ms + best.latency_ms
                measured = self._measure_student(best.choices)
                rounds.append({
                    "budget_ms": budget, "solutions": [x.to_dict() for x in sols],
                    "candidate_losses": losses, "best": j, "predicted_ms": pred,
                    "kendall_tau": None if math.isnan(tau) else tau,
                    "measured_ms": measured,
                })
                if measured is None or self.teacher_measured is None:
                    break
                got = measured / self.teacher_measured
                if got <= self.speedup + cfg.tolerance:
                    break
                budget *= self.speedup / got  # tighten towards the measured ratio
                if budget < min_latency(b):
                    self.notes.append("measured speedup missed the request and the budget "
                                      "cannot be tightened further")
                    break
                _logger.info("measured speedup %.3f misses %.3f; tightening the budget",
                             got, self.speedup)
            rec.update(prefilter=pre, rounds=len(rounds), method=cfg.method)
            if hasattr(self, "measured_in_loop"):
                rec["architectures_measured_in_loop"] = self.measured_in_loop
            self.search_rounds = rounds
            self.best = best
            if len(self.speedups) > 1:
                self.front = self._front(a, b, cand, t_logits, rounds[-1])
        return best

    def _solve_and_rank(self, a, b, budget, cand: ImageSource, t_logits):
        """K architectures (integer program, or NSGA-II), each evaluated with its distilled
        weights on `cand`; returns (solutions, losses, Kendall tau, index of the best)."""
        cfg = self.recipe.search
        if cfg.method == "nsga2":
            sols = nsga2(a, b, budget, pop_size=cfg.pop_size, generations=cfg.generations,
                         seed=self.recipe.data.seed, time_limit=cfg.time_limit,
                         latency_fn=self._latency_in_loop())[: cfg.k]
            if not sols:
                raise SearchError("NSGA-II found no architecture within the budget; use the "
                                  "integer program (--search ip) or a larger budget")
        else:
            sols = solve(a, b, budget, k=cfg.k, overlap=cfg.overlap, solver=cfg.solver,
                         time_limit=cfg.time_limit, teacher_ms=self.teacher_pred,
                         fixed_ms=self.stem_ms + self.head_ms,
                         total_time_limit=cfg.total_time_limit, gap=cfg.gap)
        losses = [self._candidate_loss(sol.choices, cand, t_logits) for sol in sols]
        tau = kendall_tau([sol.objective for sol in sols], losses)
        j = min(range(len(sols)), key=losses.__getitem__)
        return sols, losses, tau, j

    def _latency_in_loop(self):
        """DONNA's hardware in the loop for NSGA-II: each architecture's latency measured end to
        end on the target (less the LUT's stem and head, to stay on the layers' scale of the
        budget), when the recipe asks for it and the target's hardware is here; else None (the
        LUT sum)."""
        if not self.recipe.search.hardware_in_loop:
            return None
        if not self._hardware_here():
            note = ("search.hardware_in_loop: the target's hardware is not here, so NSGA-II "
                    "used the LUT's latencies")
            if note not in self.notes:
                self.notes.append(note)
            return None
        fixed = self.stem_ms + self.head_ms

        def measured(choices: list[str]) -> float:
            self.measured_in_loop = getattr(self, "measured_in_loop", 0) + 1
            return self._measure_student(choices) - fixed

        return measured

    def _front(self, a, b, cand: ImageSource, t_logits, final_round: dict) -> dict:
        """Best architecture per requested speedup, all from the same pool and LUT."""
        fixed = self.stem_ms + self.head_ms
        points = []
        for sp in self.speedups:
            if sp == self.speedup:
                j = final_round["best"]
                sol = final_round["solutions"][j]
                points.append({"speedup_requested": sp, "latency_ms": fixed + sol["latency_ms"],
                               "loss": final_round["candidate_losses"][j],
                               "choices": sol["choices"]})
                continue
            try:
                sols, losses, _, j = self._solve_and_rank(
                    a, b, sp * self.teacher_pred - fixed, cand, t_logits)
            except SearchError as e:  # InfeasibleError included: the point says why
                points.append({"speedup_requested": sp, "latency_ms": None, "loss": None,
                               "choices": None, "error": str(e)})
                continue
            points.append({"speedup_requested": sp, "latency_ms": fixed + sols[j].latency_ms,
                           "loss": losses[j], "choices": sols[j].choices})
        teacher = {"latency_ms": self.teacher_pred, "loss": mean_loss(t_logits, t_logits)}
        return {"points": points, "teacher": teacher}

    def _candidate_loss(self, choices, images: ImageSource, t_logits) -> float:
        model = self._assemble(choices).eval()
        return mean_loss(predict(model, images, self.runtime), t_logits)

    def _assemble(self, choices) -> nn.Module:
        s = self.split()
        weights = {
            i: load_weights(self.store, self.distill_root, i, op)
            for i, op in enumerate(choices)
            if op != TEACHER
        }
        return s.assemble(list(choices), weights=weights)

    def _hardware_here(self) -> bool:
        return can_measure(self.lut, self.lut_path)

    def _measure_student(self, choices) -> float | None:
        if not self._hardware_here():
            self.teacher_measured = None
            return None
        if not hasattr(self, "teacher_measured"):
            self.teacher_measured = measure_model(
                self.teacher, self.input_size, self.lut.target
            ).ms
        return measure_model(self._assemble(choices), self.input_size, self.lut.target).ms

    def finetune(self) -> nn.Module:
        parts = self._images()
        if not hasattr(self, "best"):
            self.search()
        cfg = self.recipe.finetune
        choices = self.best.choices
        key = digest(self.distill_root.name, choices, cfg.__dict__, self.data_fp["distill"],
                     self.data_fp["search"], self.train_cfg if cfg.augment else None)
        path = self.store.path(self.teacher_key, "finetune", f"{key}.safetensors")
        student = self._assemble(choices)
        with self._phase("finetune") as rec:
            if path.exists():
                student.load_state_dict(self.store.load_tensors(path))
                rec["cached"] = True
            else:
                ckpt = path.with_suffix(".ckpt")
                rec.update(finetune(student, self.teacher, parts["distill"], cfg, self.progress,
                                    seed=self.recipe.data.seed, val=parts["search"],
                                    runtime=self.runtime, checkpoint=ckpt))
                self.store.save_tensors(path, student.state_dict())
                ckpt.unlink(missing_ok=True)
                rec["cached"] = False
        self.student = student.eval()
        return self.student

    def evaluate(self) -> dict:
        parts = self._images()
        if not hasattr(self, "student"):
            self.finetune()
        ev = parts["eval"]
        with self._phase("evaluate"):
            t_logits = predict(self.teacher, ev, self.runtime)
            s_logits = predict(self.student, ev, self.runtime)
            self.eval_teacher = evaluate(t_logits)
            self.eval_student = evaluate(s_logits, t_logits)
        return self.eval_student

    def report(self) -> dict:
        if not hasattr(self, "eval_student"):
            self.evaluate()
        s = self.split()
        best = self.best
        last = self.search_rounds[-1]
        s_pred = self.stem_ms + self.head_ms + best.latency_ms
        s_meas = last["measured_ms"]
        t_meas = getattr(self, "teacher_measured", None)
        return {
            "teacher_name": self.teacher_name,
            "target": self.lut.target.to_dict() | {"estimated": self.lut.estimated,
                                                   "overhead_ms": self.lut.overhead_ms},
            "lut_fingerprint": self.lut.fingerprint,
            "recipe": self.recipe.to_dict(),
            "layers": [layer.name for layer in s.layers],
            "teacher": {
                "latency_ms": {"predicted": self.teacher_pred, "measured": t_meas},
                "top1": self.eval_teacher["top1"],
            },
            "student": {
                "latency_ms": {"predicted": s_pred, "measured": s_meas},
                "top1": self.eval_student["top1"],
                "agreement": self.eval_student.get("agreement"),
                "choices": list(best.choices),
                "search_objective": best.objective,
            },
            "speedup": {
                "requested": self.speedup,
                "predicted": s_pred / self.teacher_pred,
                "measured": (s_meas / t_meas) if (s_meas and t_meas) else None,
                "min_reachable": self.min_pred / self.teacher_pred,
            },
            "eval_images": self.eval_student["images"],
            "labelled_eval_images": self.eval_student["labelled_images"],
            "data": {k: len(v) for k, v in self.parts.items()} | {
                "skipped": len(self._skipped()), "skipped_files": self._skipped()[:20]},
            "runtime": self.runtime.to_dict(),
            "distill": {"failed_ops": self.failed_ops},
            "search": {"rounds": self.search_rounds},
            "front": getattr(self, "front", None),
            "phases": self.phases,
            "notes": self.notes,
        }

    def all(self) -> Result:
        torch.manual_seed(self.recipe.data.seed)
        self.split()
        self.luts()  # before training: an unreachable speedup fails in seconds
        self.distill()
        self.fitness()
        self.search()
        self.finetune()
        report = self.report()
        return Result(self.student, report, self.teacher_name, self.teacher_args,
                      tuple(self.input_size))


def compress(
    model: str | nn.Module,
    data: str | Path,
    target: str = "cpu",
    speedup: float = 0.5,
    *,
    output: str | Path | None = None,
    push_to_hub: str | None = None,
    **kwargs,
) -> Result:
    """Compress `model` so that it runs in `speedup` x the teacher's latency on `target`.

    Args:
        model: a timm model name or your own trained ``nn.Module``.
        data: a folder of images (ImageFolder with wnid folder names, or flat).
        target: a target profile name (``latency_luts.list_targets()``) or a LUT file.
        speedup: student latency / teacher latency, in (0, 1); 0.5 = twice as fast.
        output: if given, the folder to write (safetensors, config.json, README, ONNX, report).
        push_to_hub: if given, ``ORG/NAME`` to upload the written model to.
        **kwargs: see `Run` (checkpoint, recipe, work_dir, val_data, random_init, ...).

    Example:
        >>> import compressor
        >>> result = compressor.compress("tf_efficientnet_lite0", data="images/",
        ...                              target="cpu", speedup=0.5)  # doctest: +SKIP
        >>> result.save_pretrained("out/")  # doctest: +SKIP
    """
    result = Run(model, data, target, speedup, **kwargs).all()
    if output is not None:
        result.save_pretrained(output)
    if push_to_hub:
        result.push_to_hub(push_to_hub)
    return result
