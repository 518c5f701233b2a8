"""How much closer do ops start, and end, when they inherit the teacher layer's weights?

    python benchmarks/inheritance.py --model tf_efficientnet_lite0 --json

Runs the distillation phase of the run ``compress`` would make (same recipe, data split and
pool; ``--work-dir`` caches it) twice, with ``distill.inherit`` on and off, and prints per op
(over the layers it trained on) the mean normalised MSE (the distillation loss: MSE over the
teacher layer output's mean square) of the first batch, before any update (``init``), and of
the last epoch (``final``), and with inheritance how many layers kept an inherited start:

    {"op", "layers", "inherited_layers", "init_on", "init_off", "final_on", "final_off"}

and a last line with the means over every op.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from compressor.inputs import prepare
from compressor.pipeline import distill_step, lut_step
from compressor.recipe import default_recipe_name, load_recipe

__all__ = ["main"]

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def _pool(model: str, data: Path, target: str, work_dir: Path, recipe: str | None,
          inherit: bool):
    r = load_recipe(recipe or default_recipe_name(model, target)).override(
        "distill", inherit=inherit)
    run = prepare(model, data, target, 0.5, recipe=r, work_dir=work_dir, progress=False)
    return distill_step(run, lut_step(run, check=False)).results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/hant-quality-front"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    on = _pool(args.model, args.data, args.target, args.work_dir, args.recipe, True)
    off = _pool(args.model, args.data, args.target, args.work_dir, args.recipe, False)
    keys = sorted(k for k in on if k in off and on[k].status == off[k].status == "ok")
    rows = []
    for op in sorted({k[1] for k in keys}):
        ks = [k for k in keys if k[1] == op]
        rows.append({
            "op": op, "layers": len(ks),
            "inherited_layers": sum(bool(on[k].inherited) for k in ks),
            "init_on": statistics.fmean(on[k].init_loss for k in ks),
            "init_off": statistics.fmean(off[k].init_loss for k in ks),
            "final_on": statistics.fmean(on[k].loss for k in ks),
            "final_off": statistics.fmean(off[k].loss for k in ks),
        })
    rows.append({
        "op": "all", "layers": len(keys),
        "inherited_layers": sum(bool(on[k].inherited) for k in keys),
        "init_on": statistics.fmean(on[k].init_loss for k in keys),
        "init_off": statistics.fmean(off[k].init_loss for k in keys),
        "final_on": statistics.fmean(on[k].loss for k in keys),
        "final_off": statistics.fmean(off[k].loss for k in keys),
    })
    for row in rows:
        print(json.dumps(row) if args.json else
              {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
