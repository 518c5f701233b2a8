"""The pipeline: plain phase steps, each ``(inputs, artifacts before) -> artifact``, composed by
`compress` in one direction (split -> LUT -> distilled pool -> fitness table -> search ->
finetuned student -> evaluation -> report). The ``hant`` commands call the same steps. No step
looks for what ran before it: it is given what it needs. Each artifact is cached in the work dir
under a key of what it depends on, so a second run reuses it and an interrupted one resumes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

import ops_pool
from latency_luts import LUT, LutError

from .baseline import drop_blocks
from .complexity import complexity
from .distill import ENGINE_VERSION
from .evaluate import evaluate, mean_loss, predict
from .finetune import finetune
from .fitness import Fitness, fitness
from .inputs import RunInputs, divisor_key, prepare
from .latency import Latencies, Measurer, latency_table, stale
from .pool import Pool, calibrate_pool, distill_pool
from .redistill import redistill
from .selection import Selection, select_architecture
from .split import TEACHER
from .store import artifact_lock, cached, digest, seal, unseal

__all__ = ["Result", "Steps", "Student", "compress", "run_all", "run_steps", "lut_step",
           "distill_step", "fitness_step", "search_step", "redistill_step", "finetune_step",
           "runoff_step", "evaluate_step", "build_report"]

_logger = logging.getLogger(__name__)


@dataclass
class Result:
    """What `compress` returns: the student, its report, and how to write it out."""

    model: nn.Module
    report: dict
    teacher_name: str
    teacher_args: dict = field(default_factory=dict)
    input_size: tuple = (3, 224, 224)

    def save_pretrained(self, out_dir, onnx: bool = True, repo_id: str | None = None) -> Path:
        """Write the model folder (`compressor.save_pretrained`); `repo_id` (``ORG/NAME``)
        names the Hub repo in the model card's load line."""
        from .publish import save_pretrained

        return save_pretrained(
            self.model, out_dir, teacher_name=self.teacher_name, teacher_args=self.teacher_args,
            choices=self.report["student"]["choices"], input_size=self.input_size,
            report=self.report, onnx=onnx, repo_id=repo_id,
        )

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    revision: str | None = None, api=None) -> str:
        """Write the folder to a temporary directory and upload it (`compressor.push_to_hub`);
        returns the commit URL."""
        import tempfile

        from .publish import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", repo_id=repo_id)
            return push_to_hub(folder, repo_id, token=token, private=private,
                               revision=revision, api=api)


@dataclass
class Student:
    """The finetune phase's artifact: the student (eval mode) and what its finetune did."""

    model: nn.Module
    record: dict


def lut_step(run: RunInputs, check: bool = True) -> Latencies:
    """b_ij for every candidate, stem and head; with `check`, fails in seconds if the speedup
    is unreachable (`hant distill`, whose result does not depend on it, does not check)."""
    with run.phase("lut") as rec, _lut_lock(run):
        lat = latency_table(run.split, run.arch_key, run.candidates, run.lut, run.lut_path,
                            run.progress, run.recipe.search.calibration_archs)
        rec.update(lat.to_dict())
    if lat.estimated:
        t = run.lut.target
        run.note(f"target '{t.name}' ({t.hardware or t.device}) is not on this machine: its "
                 "latencies are roofline estimates, and the student is not measured end to end")
    if check:
        lat.check_reachable(run.speedup, run.teacher_name, run.lut.target.name)
    return lat


@contextlib.contextmanager
def _lut_lock(run: RunInputs) -> Iterator[None]:
    """The work dir's LUT locked while it grows; what another run on the same work dir has
    measured meanwhile is taken in first, so no entry is measured or written twice."""
    if run.lut_path is None:  # a LUT file given by the user is only read
        yield
        return
    with artifact_lock(run.lut_path):
        if run.lut_path.exists():
            try:
                disk = LUT.load(run.lut_path)
            except (LutError, ValueError):
                disk = None  # damaged: warned about when the run started, measured again
            if disk is not None and stale(disk, run.lut.target) is None:
                for k, v in disk.entries.items():
                    run.lut.entries.setdefault(k, v)
                for name in ("overhead_ms", "calibration"):
                    if getattr(run.lut, name) is None:
                        setattr(run.lut, name, getattr(disk, name))
        unseal(run.lut_path)  # it may grow now; sealed again once complete
        yield
        if run.lut_path.exists():
            seal(run.lut_path)


def distill_step(run: RunInputs, lat: Latencies | None) -> Pool:
    """Phase 1 over the distill part; with `lat`, ops slower than the teacher's layer are never
    trained (`compress` and `hant distill` both pass it, so both train the same ops)."""
    cfg = run.recipe.distill
    # keyed by what decides the weights, not by the schedule (group size, cache, device)
    key = digest(cfg.result_dict(), ENGINE_VERSION, run.data_fp["distill"], run.data_cfg,
                 run.train_cfg if cfg.augment else None, *divisor_key())
    with run.phase("distill") as rec:
        pool = distill_pool(run.split, run.candidates, run.parts["distill"], cfg, run.store,
                            run.store.path(run.teacher_key, "distill", key), latencies=lat,
                            runtime=run.runtime, progress=run.progress)
        rec.update(ops=len(pool.results), skipped_slower_than_teacher=pool.skipped_slower,
                   failed=len(pool.failed))
    n = min(run.recipe.fitness.bn_recalibrate_images, len(run.parts["distill"]))
    if n <= 0:
        return pool
    images = run.parts["distill"].subset(range(n))  # the eval view: as fitness sees its images
    root = run.store.path(run.teacher_key, "batchnorm", digest(pool.root.name,
                                                               images.fingerprint(),
                                                               run.data_cfg))
    with run.phase("calibrate") as rec:
        pool = calibrate_pool(pool, images, root, runtime=run.runtime, progress=run.progress)
        rec.update(images=n)
    return pool


def fitness_step(run: RunInputs, pool: Pool) -> Fitness:
    """a_ij: every distilled op alone in the teacher, scored on the search part."""
    ok = pool.ok(run.candidates)
    key = digest(pool.key, run.data_fp["search"], ok, run.recipe.fitness.loss)
    path = run.store.path(run.teacher_key, "fitness", f"{key}.json")

    def compute() -> Fitness:
        ops = {i: {op: pool.op(i, op) for op in names} for i, names in ok.items()}
        return fitness(run.split, ops, run.parts["search"], run.recipe.data.batch_size,
                       run.progress, runtime=run.runtime, loss=run.recipe.fitness.loss)

    with run.phase("fitness") as rec:
        fit, rec["cached"] = cached(path, compute, lambda f, p: f.save(run.store, p),
                                    lambda p: Fitness.load(run.store, p))
        rec["images"] = fit.images
    return fit


def search_step(run: RunInputs, lat: Latencies, pool: Pool, fit: Fitness) -> Selection:
    """Phase 2: K diverse architectures, ranked on a few search images, the best one measured."""
    n_eval = min(run.recipe.data.candidate_eval_images, len(run.parts["search"]))
    cand = run.parts["search"].subset(range(n_eval)).decode()  # ranked many times
    measurer = Measurer(run.lut, run.lut_path, run.teacher, run.input_size)
    cfg = run.recipe.search
    rerank = None
    if cfg.rerank_top > 0:  # a brief re-distillation, as the redistill step's but shorter
        distill = run.parts["distill"]
        rerank = (distill.subset(range(min(cfg.rerank_images, len(distill)))),
                  replace(run.recipe.redistill, epochs=cfg.rerank_epochs))
    with run.phase("search") as rec:
        sel = select_architecture(
            pool, lat, fit, cand, run.teacher, cfg, run.recipe.fitness,
            run.speedups, measurer, candidates=sum(map(len, run.candidates.values())),
            runtime=run.runtime, seed=run.recipe.data.seed, rerank=rerank)
        rec.update(sel.to_dict())
    for note in sel.notes:
        run.note(note)
    return sel


def _trained(run: RunInputs, phase: str, path: Path, model: nn.Module,
             train: Callable[[], dict]) -> Student:
    """`model` with the weights cached at `path`, else trained in place by `train` (which
    returns its record) and saved there, its record beside it (a cached student still says
    which weights its finetune kept): the re-distill and finetune steps."""
    record: dict = {}
    record_path = path.with_suffix(".json")

    def compute() -> nn.Module:
        record.update(train())
        return model

    def save(m: nn.Module, p: Path) -> None:
        run.store.write_json(record_path, record)  # first: the weights mark the artifact done
        run.store.save_tensors(p, m.state_dict())

    def load(p: Path) -> nn.Module:
        model.load_state_dict(run.store.load_tensors(p))
        if record_path.is_file():  # absent in work dirs from before the records were kept
            record.update(run.store.read_json(record_path))
        return model

    with run.phase(phase) as rec:
        _, rec["cached"] = cached(path, compute, save, load)
        rec.update(record)
    return Student(model.eval(), record)


def redistill_step(run: RunInputs, pool: Pool, choices: list[str]) -> Student:
    """The chosen architecture with its distilled weights, its replaced ops refitted in
    network order on its own inputs (recipe ``redistill``; 0 epochs: as distilled)."""
    cfg = run.recipe.redistill
    student = pool.assemble(list(choices))
    if cfg.epochs <= 0 and not cfg.correct:
        return Student(student, {"key": "", "epochs": 0})
    key = digest(pool.key, list(choices), cfg.__dict__, run.data_fp["distill"],
                 run.train_cfg if cfg.augment else None)
    path = run.store.path(run.teacher_key, "redistill", f"{key}.safetensors")
    out = _trained(run, "redistill", path, student, lambda: redistill(
        student, run.split, run.parts["distill"], cfg, runtime=run.runtime,
        seed=run.recipe.data.seed, progress=run.progress))
    out.record["key"] = key  # joins the finetune's key
    return out


def finetune_step(run: RunInputs, pool: Pool, choices: list[str],
                  start: Student | None = None) -> Student:
    """The chosen architecture (from `start`, the re-distilled student, when given; else with
    its distilled weights), finetuned on the distill part (the search part's loss logged per
    epoch); resumes at its epoch."""
    cfg = run.recipe.finetune
    key = digest(pool.key, list(choices), cfg.__dict__, run.data_fp["distill"],
                 run.data_fp["search"], run.train_cfg if cfg.augment else None,
                 *([start.record["key"]] if start is not None and start.record.get("key")
                   else []))
    path = run.store.path(run.teacher_key, "finetune", f"{key}.safetensors")
    checkpoint = path.with_suffix(".ckpt")
    student = start.model if start is not None else pool.assemble(list(choices))
    features = (pool.assemble([TEACHER] * len(choices)) if cfg.feature_epochs > 0 else None)
    out = _trained(run, "finetune", path, student, lambda: finetune(
        student, run.teacher, run.parts["distill"], cfg, run.progress,
        seed=run.recipe.data.seed, val=run.parts["search"], runtime=run.runtime,
        checkpoint=checkpoint, teacher_features=features))
    checkpoint.unlink(missing_ok=True)  # the finished weights are saved
    return out


def runoff_step(run: RunInputs, lat: Latencies, pool: Pool, fit: Fitness, sel: Selection,
                student: Student) -> tuple[Selection, Student]:
    """With ``search.block_drop_runoff``: the block-dropping architecture
    (`compressor.baseline`) at the pick's measured latency, re-distilled and finetuned as the
    student was, replaces it when its loss on the search part (KL to the teacher, as the
    finetune scores its epochs) is lower and it measures within the request. On the shared images
    the finetune lowered a block-dropped network's loss where it raised a student's with
    replaced ops, so the ranking before the finetune cannot see this."""
    cfg = run.recipe.search
    if not cfg.block_drop_runoff:
        return sel, student
    search = run.parts["search"]
    with run.phase("runoff") as rec:
        goal = (sel.measured_speedup * lat.teacher_ms if sel.measured_speedup
                else lat.fixed_ms + sel.best.latency_ms)
        base = drop_blocks(lat, fit, goal)
        rec.clear()  # a second runoff in one run describes itself only
        rec["choices"] = base.choices
        if not len(search):
            rec["skipped"] = "no search part to compare the two on"
        elif not base.reached or base.choices == list(sel.best.choices):
            rec["skipped"] = ("block dropping cannot reach the pick's latency" if not base.reached
                              else "the pick drops blocks only")
        if rec.get("skipped"):
            return sel, student
        pm = Measurer(run.lut, run.lut_path, run.teacher, run.input_size).paired(
            pool.assemble(base.choices))
        rec["measured_speedup"] = pm.ratio if pm else None
        if pm is not None and pm.ratio > run.speedup + cfg.tolerance:
            rec["skipped"] = (f"it measures {pm.ratio:.3f}, slower than the requested "
                              f"{run.speedup} + tolerance {cfg.tolerance}")
            return sel, student
        # both networks scored here, on the search part, as the finetune scores its epochs (a
        # finetune cached by an older version carries no record of its own)
        t_search = predict(run.teacher, search, run.runtime)
        own = rec["student_search_loss"] = mean_loss(
            predict(student.model, search, run.runtime), t_search)
        mine = {k: run.phases.pop(k) for k in ("redistill", "finetune") if k in run.phases}
        other = finetune_step(run, pool, base.choices, redistill_step(run, pool, base.choices))
        for k in ("redistill", "finetune"):  # the student's own records stay where they were
            if k in run.phases:
                rec[k] = run.phases.pop(k)
        run.phases.update(mine)
        theirs = mean_loss(predict(other.model, search, run.runtime), t_search)
        rec["block_drop_search_loss"] = theirs
        rec["kept"] = "block-drop" if theirs < own else "student"
    if rec["kept"] == "student":
        return sel, student
    run.note(f"block dropping ({base.choices.count('identity')} blocks) was closer to the "
             f"teacher on the search part after the same finetune ({theirs:.4f} against "
             f"{own:.4f}) and replaced the searched architecture")
    best = base.solution(lat, fit)
    timed = {"measured_ms": pm.b_ms if pm else None,
             "teacher_measured_ms": pm.a_ms if pm else None,
             "measured_speedup": pm.ratio if pm else None,
             "search_loss": theirs, "replaced_search_loss": own}
    return replace(sel, best=best, runoff=timed), other


def evaluate_step(run: RunInputs, student: nn.Module) -> dict[str, dict]:
    """Teacher and student on the held-out part (or ``--val-data``), never seen before."""
    ev = run.parts["eval"]
    with run.phase("evaluate"):
        t_logits = predict(run.teacher, ev, run.runtime)
        s_logits = predict(student, ev, run.runtime)
    return {"teacher": evaluate(t_logits), "student": evaluate(s_logits, t_logits)}


def build_report(run: RunInputs, lat: Latencies, pool: Pool, sel: Selection,
                 scores: dict[str, dict], student: nn.Module | None = None) -> dict:
    """Everything measured, for report.json and the model card (with `student`, the finetuned
    model, also the params, GMACs and activations of both)."""
    s_pred = lat.fixed_ms + sel.best.latency_ms
    s_meas, t_meas = sel.measured_ms, sel.teacher_measured_ms
    skipped = run.skipped_files()
    return {
        "teacher_name": run.teacher_name,
        "target": run.lut.target.to_dict() | {"estimated": run.lut.estimated,
                                              "overhead_ms": run.lut.overhead_ms},
        "lut_fingerprint": run.lut.fingerprint,
        "recipe": run.recipe.to_dict(),
        "runtime": run.runtime.to_dict(),
        "layers": [layer.name for layer in run.split.layers],
        "teacher": {"latency_ms": {"predicted": lat.teacher_ms, "measured": t_meas},
                    "top1": scores["teacher"]["top1"]},
        "student": {
            "latency_ms": {"predicted": s_pred, "measured": s_meas},
            "top1": scores["student"]["top1"],
            "agreement": scores["student"].get("agreement"),
            "choices": list(sel.best.choices),
            "search_objective": sel.best.objective,
        },
        "speedup": {
            "requested": run.speedup,
            "predicted": s_pred / lat.teacher_ms,
            "measured": sel.measured_speedup,
            "min_reachable": lat.min_ms / lat.teacher_ms,
        },
        "eval_images": scores["student"]["images"],
        "labelled_eval_images": scores["student"]["labelled_images"],
        "data": {k: len(v) for k, v in run.parts.items()} | {"skipped": len(skipped),
                                                             "skipped_files": skipped[:20]},
        "distill": {"failed_ops": pool.failed},
        "search": {"rounds": sel.rounds, "chosen_round": sel.chosen_round % len(sel.rounds),
                   "runoff": sel.runoff},
        "front": sel.front,
        "layer_latency_ms": _layer_latencies(lat, sel.best.choices),
        "complexity": _complexity(run, student) if student is not None else None,
        "sources": run.sources,
        "phases": run.phases,
        "notes": run.notes,
    }


def _layer_latencies(lat: Latencies, choices: list[str]) -> dict:
    """Per layer, the LUT's latency of the teacher's layer and of the chosen op (layers.png)."""
    return {"stem": lat.stem_ms, "head": lat.head_ms,
            "teacher": [layer[TEACHER] for layer in lat.b],
            "student": [layer[op] for layer, op in zip(lat.b, choices)]}


def _complexity(run: RunInputs, student: nn.Module) -> dict:
    """Params, GMACs and activations of the teacher and of the student's inference form."""
    return {"input_size": list(run.input_size),
            "teacher": complexity(run.teacher, run.input_size),
            "student": complexity(ops_pool.reparameterize(student), run.input_size)}


@dataclass
class Steps:
    """Every step's artifact of one run (what `run_all` reports; benchmarks reuse them)."""

    lat: Latencies
    pool: Pool
    fit: Fitness
    sel: Selection
    student: Student
    scores: dict[str, dict]


def run_steps(run: RunInputs) -> Steps:
    """Every phase in order, from checked inputs (`prepare`) to the finetuned, evaluated
    student."""
    torch.manual_seed(run.recipe.data.seed)
    lat = lut_step(run)  # before training: an unreachable speedup fails in seconds
    pool = distill_step(run, lat)
    fit = fitness_step(run, pool)
    sel = search_step(run, lat, pool, fit)
    start = redistill_step(run, pool, sel.best.choices)
    student = finetune_step(run, pool, sel.best.choices, start)
    sel, student = runoff_step(run, lat, pool, fit, sel, student)
    return Steps(lat, pool, fit, sel, student, evaluate_step(run, student.model))


def run_all(run: RunInputs) -> Result:
    """`run_steps`, then the student with its report."""
    st = run_steps(run)
    report = build_report(run, st.lat, st.pool, st.sel, st.scores, st.student.model)
    return Result(st.student.model, report, run.teacher_name, run.teacher_args, run.input_size)


def compress(
    model: str | nn.Module,
    data: str | Path,
    target: str = "cpu",
    speedup: float | list[float] = 0.5,
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
        speedup: student latency / teacher latency, in (0, 1); 0.5 = twice as fast. A list
            also computes a front (the model returned is the first one's).
        output: if given, the folder to write (safetensors, config.json, README, ONNX, report).
        push_to_hub: if given, ``ORG/NAME`` to upload the written model to.
        **kwargs: see `compressor.prepare` (checkpoint, recipe, work_dir, val_data,
            random_init, ...).

    Example:
        >>> import compressor
        >>> result = compressor.compress("tf_efficientnet_lite0", data="images/",
        ...                              target="cpu", speedup=0.5)  # doctest: +SKIP
        >>> result.save_pretrained("out/")  # doctest: +SKIP
    """
    if push_to_hub:
        from .publish import check_repo_id

        check_repo_id(push_to_hub)  # before the run, not after it
    result = run_all(prepare(model, data, target, speedup, **kwargs))
    if output is not None:
        folder = result.save_pretrained(output, repo_id=push_to_hub)
        if push_to_hub:
            from .publish import push_to_hub as push

            push(folder, push_to_hub)
    elif push_to_hub:
        result.push_to_hub(push_to_hub)
    return result
