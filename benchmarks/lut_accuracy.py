"""How well the LUT sum predicts end-to-end latency.

Draws random architectures from the pool (a random candidate op per layer), predicts each one's
latency as ``stem + head + sum of its ops`` from the LUT (entries net of the backend's per-call
overhead, which the stem figure carries once), measures the assembled network end to end on the
same backend, in alternation with the teacher (``--rounds``, `latency_luts.measure_paired`, so
that the measured speedup holds while the machine's speed drifts), and prints the error
statistics as JSON.

Usage::

    python benchmarks/lut_accuracy.py --model tf_efficientnet_lite0 --target cpu --archs 20 --json

The LUT is ``--lut FILE`` if given (read-only), else the shipped table
``latency_luts/tables/MODEL-TARGET.json`` if it was measured on this machine's device, else the
work dir's LUT for the target (missing entries are measured first). The target's hardware must be
here: an estimate cannot be checked against a measurement.

The LUT sums are checked raw and, where the LUT has a calibration (or ``--calibrate-archs N``
fits one on N other networks, not saved), calibrated; ``speedup_*`` compare each network's
predicted speedup (its sum over the teacher's) with its measured one.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys

import torch

import latency_luts
from compressor.inputs import arch_key, candidate_ops
from compressor.latency import Measurer, calibrate, layer_latencies, resolve_target, stale
from compressor.recipe import load_recipe
from compressor.split import TEACHER, split
from compressor.store import Store, default_work_dir
from compressor.teacher import load_teacher


def _pick_lut(args, store: Store):
    if args.lut:
        return resolve_target(args.target, store, lut=args.lut)
    shipped = latency_luts.shipped_table(args.model, args.target)
    if shipped is not None:
        lut = latency_luts.LUT.load(shipped)
        why = stale(lut, lut.target)
        if why is None:
            return lut, None
        logging.warning("shipped LUT %s: %s; using the work dir's", shipped, why)
    return resolve_target(args.target, store)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--target", default="cpu")
    p.add_argument("--archs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default="default", help="its pool gives the candidate ops")
    p.add_argument("--lut", default=None, help="a LUT file (read-only)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--calibrate-archs", type=int, default=0,
                   help="fit a calibration on this many other networks and report both errors")
    p.add_argument("--rounds", type=int, default=5,
                   help="alternating rounds of each network with the teacher")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO,
                        format="%(message)s")
    torch.manual_seed(args.seed)

    target = latency_luts.get_target(args.target)
    if not latency_luts.hardware_present(target):
        sys.exit(f"target '{target.name}' is not on this machine: nothing to measure against")
    net, name, _ = load_teacher(args.model, random_init=True)
    net.eval()
    s = split(net, model_name=name)
    cands = candidate_ops(s, load_recipe(args.recipe).pool)
    store = Store(args.work_dir or default_work_dir())
    lut, lut_path = _pick_lut(args, store)
    key = arch_key(name, net, s)
    stored, lut.calibration = lut.calibration, None  # the raw sums first
    b, stem_ms, head_ms = layer_latencies(s, key, cands, lut, lut_path, progress=not args.json)
    cal = stored
    if args.calibrate_archs:  # fitted on other networks than the ones checked below
        cal = calibrate(s, key, cands, lut, None, args.calibrate_archs, seed=args.seed + 1,
                        progress=not args.json)
    lut.calibration = cal

    rng = random.Random(args.seed)
    archs = [[TEACHER] * len(s.layers)]
    while len(archs) < args.archs + 1:
        archs.append([rng.choice(cands[i]) for i in range(len(s.layers))])
    rows = []
    measurer = Measurer(lut, lut_path, net, s.input_size)
    if not measurer.here:
        sys.exit(f"the LUT was made on {lut.fingerprint.get('device')}, not on this machine: "
                 "its sums cannot be checked here")
    for n, choices in enumerate(archs):
        pred = stem_ms + head_ms + sum(b[i][op] for i, op in enumerate(choices))
        # in alternation with the teacher: the measured speedup holds on a drifting machine
        pm = measurer.paired(s.assemble(choices).eval(), rounds=args.rounds)
        err = 100.0 * (pred - pm.b_ms) / pm.b_ms
        cal_pred = lut.network_ms(pred)
        rows.append({"choices": choices, "predicted_ms": pred, "measured_ms": pm.b_ms,
                     "teacher_measured_ms": pm.a_ms, "measured_speedup": pm.ratio,
                     "ratio_spread": pm.ratio_spread, "err_pct": err,
                     "calibrated_ms": cal_pred,
                     "calibrated_err_pct": 100.0 * (cal_pred - pm.b_ms) / pm.b_ms})
        logging.info("%s %2d predicted %.3f ms measured %.3f ms (teacher %.3f) error %+.1f %%",
                     "teacher" if n == 0 else "arch   ", n, pred, pm.b_ms, pm.a_ms, err)
    errs = [abs(r["err_pct"]) for r in rows[1:]]
    t = rows[0]

    def speedup_errs(field: str) -> list[float]:  # predicted vs measured (arch / teacher)
        return [100.0 * abs((r[field] / t[field]) / r["measured_speedup"] - 1) for r in rows[1:]]

    out = {
        "median_abs_err_pct": round(statistics.median(errs), 2),
        "max_abs_err_pct": round(max(errs), 2),
        "archs": len(errs),
        "mean_signed_err_pct": round(statistics.mean(r["err_pct"] for r in rows[1:]), 2),
        "teacher_err_pct": round(rows[0]["err_pct"], 2),
        "speedup_median_abs_err_pct": round(statistics.median(speedup_errs("predicted_ms")), 2),
        "speedup_max_abs_err_pct": round(max(speedup_errs("predicted_ms")), 2),
        "model": name,
        "target": lut.target.name,
        "device": lut.fingerprint.get("device"),
        "overhead_ms": lut.overhead_ms,
        "calibration": cal,
        "lut": str(lut_path or args.lut or latency_luts.shipped_table(args.model, args.target)),
    }
    if cal:
        cerrs = [abs(r["calibrated_err_pct"]) for r in rows[1:]]
        out |= {"calibrated_median_abs_err_pct": round(statistics.median(cerrs), 2),
                "calibrated_max_abs_err_pct": round(max(cerrs), 2),
                "calibrated_teacher_err_pct": round(rows[0]["calibrated_err_pct"], 2),
                "calibrated_speedup_median_abs_err_pct":
                    round(statistics.median(speedup_errs("calibrated_ms")), 2),
                "calibrated_speedup_max_abs_err_pct":
                    round(max(speedup_errs("calibrated_ms")), 2)}
    print(json.dumps(out) if args.json else json.dumps({**out, "rows": rows}, indent=1))
    return out


if __name__ == "__main__":
    main()
