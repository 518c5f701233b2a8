"""Accuracy kept at each speedup, against a block-dropping baseline at the same latency.

    python benchmarks/quality_front.py --model tf_efficientnet_lite0 --speedups 0.8,0.65,0.5 --json
    python benchmarks/quality_front.py --model tf_efficientnet_lite1 \
        --versus tf_efficientnet_lite0 --json

For each requested speedup it runs the pipeline (``compressor.pipeline.run_steps``, the recipe the
CLI would pick) on ``--data``, in one work dir, so the LUT, the distilled pool and the fitness
table are computed once and shared by every speedup. In the same run, the baseline drops whole
same-shape blocks (``compressor.baseline.drop_blocks``: identity, greedily by accuracy drop per
millisecond saved) down to the student's measured speedup (as a share of the teacher's LUT
latency; where the LUT overshoots and the baseline measures faster than the student beyond
``search.tolerance``, the last drops are undone while it stays within it, so that both compare
at equal measured latency as far as whole blocks allow), then gets the same re-distillation
(a no-op for identities) and finetune. Both are
measured end to end on the target and scored on the held-out part. One JSON line per speedup:

    {"requested", "measured", "teacher_top1", "student_top1", "agreement", "baseline_top1",
     "baseline_agreement", "baseline_measured", "baseline_reached", "baseline_backed_off",
     "eval_images", "seconds", "student_seconds", "phase_seconds", "data_seed", "choices",
     "baseline_choices", "finetune_kept", "baseline_finetune_kept", "runoff"}

(``student_seconds``: up to the student's evaluation, what ``compress`` alone takes at that
speedup in a work dir with what earlier rows cached; ``seconds`` adds the baseline.)

``--seeds 0,1,2`` repeats the first speedup with other data seeds (other distill / search /
held-out parts; everything is recomputed for each) for the spread.

With ``--versus SMALLER`` the model is compressed to SMALLER's measured latency (the speedup is
SMALLER's measured latency over the model's, on the same target), and SMALLER is scored on the
same held-out images: the paper's headline comparison (a transformed larger model against the
smaller one at equal latency). The held-out files are the same (the split depends on the files
and the data seed only); each model sees them through its own eval transform (the lite family's
input sizes differ: 224, 240, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compressor.baseline import drop_blocks
from compressor.evaluate import evaluate, predict
from compressor.inputs import prepare
from compressor.latency import Measurer, can_measure, measure_pair
from compressor.pipeline import evaluate_step, finetune_step, redistill_step, run_steps
from compressor.recipe import default_recipe_name, load_recipe
from compressor.teacher import load_teacher

__all__ = ["main", "run_speedup"]

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def _recipe(model: str, target: str, name: str | None, seed: int):
    recipe = load_recipe(name or default_recipe_name(model, target))
    return recipe.override("data", seed=seed) if seed != recipe.data.seed else recipe


def run_speedup(model: str, data: Path, target: str, speedup: float, work_dir: Path,
                recipe: str | None = None, seed: int = 0) -> dict:
    """One row: the pipeline's student and the block-dropping baseline at `speedup`."""
    t0 = time.perf_counter()
    run = prepare(model, data, target, speedup, recipe=_recipe(model, target, recipe, seed),
                  work_dir=work_dir, progress=False)
    st = run_steps(run)
    lat, pool, fit, sel, scores = st.lat, st.pool, st.fit, st.sel, st.scores
    measured = sel.measured_speedup  # timed in alternation with the teacher
    student_seconds = round(time.perf_counter() - t0, 1)  # what `compress` alone would take
    phase_seconds = {k: v.get("seconds") for k, v in run.phases.items()}  # before the baseline's
    phase_runoff = dict(run.phases.get("runoff", {}))  # the baseline's steps would overwrite

    # the baseline drops blocks down to the student's *measured* speedup (in LUT terms), then,
    # where its own measurement is faster than the student's beyond the search's tolerance,
    # undoes the last drop while the network stays within it: the two compare at equal
    # measured latency as far as whole blocks allow, not with the LUT's overshoot
    goal = measured if measured else (lat.fixed_ms + sel.best.latency_ms) / lat.teacher_ms
    base = drop_blocks(lat, fit, goal * lat.teacher_ms)
    measurer = Measurer(run.lut, run.lut_path, run.teacher, run.input_size)
    b_pm = measurer.paired(pool.assemble(base.choices))
    backed_off = 0
    tol = run.recipe.search.tolerance
    while measured and b_pm and base.order and b_pm.ratio < measured - tol:
        back = base.undo_last(lat)
        back_pm = measurer.paired(pool.assemble(back.choices))
        if back_pm is None or back_pm.ratio > measured + tol:
            break  # one drop fewer would be slower than the student
        base, b_pm, backed_off = back, back_pm, backed_off + 1
    b_student = finetune_step(run, pool, base.choices, redistill_step(run, pool, base.choices))
    b_scores = evaluate_step(run, b_student.model)
    return {
        "requested": speedup,
        "measured": measured,
        "teacher_top1": scores["teacher"]["top1"],
        "student_top1": scores["student"]["top1"],
        "agreement": scores["student"].get("agreement"),
        "baseline_top1": b_scores["student"]["top1"],
        "baseline_agreement": b_scores["student"].get("agreement"),
        "baseline_measured": b_pm.ratio if b_pm else None,
        "baseline_reached": base.reached,
        "baseline_backed_off": backed_off,  # drops undone after measuring
        "eval_images": scores["student"]["images"],
        "seconds": round(time.perf_counter() - t0, 1),
        "student_seconds": student_seconds,
        "phase_seconds": phase_seconds,
        "data_seed": seed,
        "choices": list(sel.best.choices),
        "baseline_choices": base.choices,
        "finetune_kept": _kept(st.student.record),
        "runoff": _runoff(phase_runoff),
        "baseline_finetune_kept": _kept(b_student.record),
        "search_rounds": [_round(r) for r in sel.rounds],
    }


def _kept(rec: dict) -> dict:
    """Which weights the finetune kept (epoch 0: before training or after the feature stage)
    and the search-part losses it chose among."""
    return {"kept": rec.get("kept"), "epoch": rec.get("kept_epoch"),
            "start_loss": rec.get("start_search_loss"),
            "features_loss": (rec.get("feature_stage") or {}).get("search_loss"),
            "epoch_losses": [[h.get("search_loss"), h.get("search_loss_ema")]
                             for h in rec.get("history", [])]}


def _runoff(rec: dict) -> dict | None:
    """What `search.block_drop_runoff` decided (None where off)."""
    if not rec:
        return None
    return {k: rec.get(k) for k in ("kept", "skipped", "choices", "student_search_loss",
                                    "block_drop_search_loss", "measured_speedup")}


def _round(r: dict) -> dict:
    """What a verify round of the search decided: the pick by raw candidate loss, the pick
    after re-ranking (search.rerank_top), the rank correlation of objective and loss."""
    losses = r["candidate_losses"]
    return {"budget_ms": r["budget_ms"], "measured_speedup": r["measured_speedup"],
            "kendall_tau": r["kendall_tau"], "candidates": len(losses),
            "raw_pick": min(range(len(losses)), key=losses.__getitem__), "pick": r["best"],
            "reranked_losses": r.get("reranked_losses", {}),
            "raw_losses_of_reranked": {i: losses[int(i)] for i in r.get("reranked_losses", {})}}


def run_versus(model: str, smaller: str, data: Path, target: str, work_dir: Path,
               recipe: str | None = None) -> dict:
    """`model` compressed to `smaller`'s measured latency, both scored on the same files."""
    t0 = time.perf_counter()
    small_run = prepare(smaller, data, target, 0.5, work_dir=work_dir, progress=False)
    big_run = prepare(model, data, target, 0.5, work_dir=work_dir, progress=False)
    if not (can_measure(small_run.lut, small_run.lut_path)
            and can_measure(big_run.lut, big_run.lut_path)):
        raise SystemExit(f"--versus measures both models end to end; target {target!r}'s "
                         "hardware is not here")
    pm = measure_pair(big_run.teacher, big_run.input_size, small_run.teacher,  # in alternation
                      small_run.input_size, big_run.lut.target)
    row = run_speedup(model, data, target, round(pm.ratio, 3), work_dir, recipe)
    # the smaller model on the same held-out files, through its own eval transform
    small = evaluate(predict(small_run.teacher, small_run.parts["eval"], small_run.runtime))
    return row | {"versus": smaller, "versus_top1": small["top1"],
                  "versus_latency_ratio": pm.ratio,
                  "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--speedups", default="0.8,0.65,0.5")
    ap.add_argument("--seeds", default="0", help="data seeds for the first speedup")
    ap.add_argument("--recipe", default=None, help="default: what `compress` would pick")
    ap.add_argument("--versus", default=None, metavar="SMALLER")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/hant-quality-front"))
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    args = ap.parse_args(argv)
    load_teacher(args.model)  # fails early, one line, when the weights are missing
    rows = []
    if args.versus:
        rows.append(run_versus(args.model, args.versus, args.data, args.target, args.work_dir,
                               args.recipe))
    else:
        speedups = [float(s) for s in args.speedups.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        for i, sp in enumerate(speedups):
            for seed in (seeds if i == 0 else seeds[:1]):
                rows.append(run_speedup(args.model, args.data, args.target, sp, args.work_dir,
                                        args.recipe, seed))
                print(json.dumps(rows[-1]) if args.json else rows[-1], flush=True)
        return 0
    for row in rows:
        print(json.dumps(row) if args.json else row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
