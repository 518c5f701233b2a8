"""How much this machine's speed drifts, and what timing in alternation keeps of a speedup.

    python benchmarks/latency_drift.py --model tf_efficientnet_lite0 --target cpu --trials 12 --json

Builds the teacher and one fixed student (every other layer dropped where its shapes allow, so
about half the network), then ``--trials`` times: the student alone (one `measure_stable`, as a
LUT entry or a one-off end-to-end figure is timed) and the student against the teacher in
alternation (`latency_luts.measure_paired`, ``--rounds`` rounds, as the search's verify rounds
and `lut_accuracy.py` time a speedup). Prints the spread (max / min - 1, in %) over the trials
of the single figures and of the paired ratios: on a quiet machine both are a few percent; where
another tenant or the clock moves the machine's speed, the single figures spread and the ratios
should not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import latency_luts
from compressor.latency import measure_model, measure_pair
from compressor.split import TEACHER, split
from compressor.teacher import load_teacher

__all__ = ["main"]


def _spread(xs: list[float]) -> float:
    return round(100.0 * (max(xs) / min(xs) - 1), 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = ap.parse_args(argv)

    target = latency_luts.get_target(args.target)
    if not latency_luts.hardware_present(target):
        raise SystemExit(f"target '{target.name}' is not on this machine: nothing to measure")
    net, name, _ = load_teacher(args.model, random_init=True)
    s = split(net.eval(), model_name=name)
    same = [i for i, layer in enumerate(s.layers) if layer.in_shape == layer.out_shape]
    choices = [("identity" if i in same[::2] else TEACHER) for i in range(len(s.layers))]
    student = s.assemble(choices).eval()
    single, ratios, teacher = [], [], []
    t0 = time.perf_counter()
    for k in range(args.trials):
        single.append(measure_model(student, s.input_size, target).ms)
        pm = measure_pair(net, s.input_size, student, s.input_size, target, args.rounds)
        ratios.append(pm.ratio)
        teacher.append(pm.a_ms)
        if not args.json:
            print(f"trial {k:2d}: student alone {single[-1]:.3f} ms, teacher {pm.a_ms:.3f} ms, "
                  f"paired ratio {pm.ratio:.4f}", flush=True)
    out = {
        "model": name, "target": target.name, "device": latency_luts.device_name(target),
        "trials": args.trials, "rounds": args.rounds, "dropped_layers": same[::2],
        "single_ms_median": round(statistics.median(single), 3),
        "single_spread_pct": _spread(single),
        "teacher_ms_median": round(statistics.median(teacher), 3),
        "teacher_spread_pct": _spread(teacher),
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_spread_pct": _spread(ratios),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
