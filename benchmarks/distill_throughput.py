"""How much faster is our distillation schedule than the paper's, for the same ops and steps?

    python benchmarks/distill_throughput.py --json

One small instance: a random-init teacher (default tf_efficientnet_lite0 at 224 px), seeded
synthetic images, a few candidate ops per layer (`--ops`, fnmatch patterns as in a recipe's
``pool.include``). Both schedules run `compressor.distill.distill` with the same recipe values
(SGD, no weight decay, one epoch, the default lr and batch size), each into a fresh work dir:

* paper: one op per layer per teacher pass (HANT section 2.1): the teacher's forward pass
  (no_grad) is recomputed over the whole distill set for every round of ops
  (``group_size: 1, cache_activations: false``);
* ours: the engine's defaults (``group_size: auto, cache_activations: auto``): here the
  teacher's activations are cached once and every op trains from the cache.

Both use the same code for an op's step and for the teacher's forward pass, with the same
worker threads (``workers: auto``: on CPU, one op or teacher slice per thread), so the figure
measures the schedule alone. Every op starts from the same seed and sees the same batches for
the same steps in both, so the per-op losses must match (checked; `max_rel_loss_diff`). A
warm-up run of each schedule comes first (so neither pays for first calls into oneDNN or for
starting the workers); then the two alternate for `--repeats` timed runs each and the medians
are compared. The schedule each actually used is read back from the engine's last_run.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

from compressor.data import Images
from compressor.distill import distill, teacher_activations
from compressor.inputs import candidate_ops
from compressor.recipe import DistillCfg, PoolCfg
from compressor.split import split as split_model
from compressor.store import Store

__all__ = ["main"]

DEFAULT_OPS = ["identity", "efn_3x3_e1_se1.00", "cb_bottle_3x3_ex0.125", "cb_stack_3x3_ex0.25"]


def _time(s, cands, images, cfg) -> tuple[float, dict, str]:
    """Seconds, results and the schedule the engine says it used (from last_run.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = distill(s, cands, images, cfg, Store(tmp), Path(tmp) / "distill", progress=False)
        seconds = time.perf_counter() - t0
        info = json.loads((Path(tmp) / "distill" / "last_run.json").read_text())["ranks"][0]
        return seconds, res, f"{info['schedule']}, group size {info.get('group_size')}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=DistillCfg.batch_size)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--ops", nargs="+", default=DEFAULT_OPS, help="pool.include patterns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median kept)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="log the engine to stderr")
    args = p.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
    teacher = timm.create_model(args.model, pretrained=False).eval()
    s = split_model(teacher, input_size=(3, args.size, args.size), model_name=args.model)
    cands = candidate_ops(s, PoolCfg(include=args.ops))
    n_ops = sum(len(v) - 1 for v in cands.values())  # without the teacher op
    x = torch.randn(args.images, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(args.seed))
    images = Images(x, torch.full((args.images,), -1))
    base = DistillCfg(batch_size=args.batch_size, epochs=args.epochs)
    paper_cfg = dataclasses.replace(base, group_size=1, cache_activations=False)
    ours_cfg = base

    teacher_activations(s, x[: args.batch_size])  # warm-up
    _time(s, cands, images, ours_cfg)  # warm-up of the ops' and the workers' first calls
    _time(s, cands, images, paper_cfg)
    times: dict[str, list[float]] = {"paper": [], "ours": []}
    for r in range(args.repeats):  # alternating, so drift hits both alike
        for name in (("paper", "ours") if r % 2 == 0 else ("ours", "paper")):
            seconds, res, used = _time(s, cands, images, paper_cfg if name == "paper" else ours_cfg)
            times[name].append(seconds)
            if name == "paper":
                paper, paper_used = res, used
            else:
                ours, ours_used = res, used
    paper_s, ours_s = statistics.median(times["paper"]), statistics.median(times["ours"])
    rel = [abs(ours[k].loss - paper[k].loss) / max(abs(paper[k].loss), 1e-12) for k in paper]
    out = {
        "model": args.model, "input_size": args.size, "images": args.images,
        "batch_size": args.batch_size, "epochs": args.epochs, "layers": len(s.layers),
        "ops": n_ops, "threads": torch.get_num_threads(),
        "paper_schedule": "one op per layer per teacher pass (group_size 1, no cache)",
        "ours_schedule": "engine defaults (group_size auto, cache_activations auto)",
        "paper_used": paper_used, "ours_used": ours_used, "repeats": args.repeats,
        "paper_seconds": round(paper_s, 3),
        "ours_seconds": round(ours_s, 3),
        "paper_seconds_all": [round(t, 3) for t in times["paper"]],
        "ours_seconds_all": [round(t, 3) for t in times["ours"]],
        "ratio": round(ours_s / paper_s, 3),
        "same_ops": sorted(paper) == sorted(ours),
        "max_rel_loss_diff": float(f"{max(rel):.3g}"),
        "losses_equal": sorted(paper) == sorted(ours) and max(rel) <= 1e-4,
        "failed_ops": sum(r.status != "ok" for r in ours.values()),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:20s} {value}")
    return out


if __name__ == "__main__":
    main()
