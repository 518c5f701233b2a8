"""How fast is the search (HANT Eq. 4) at paper scale, and how does NSGA-II compare?

    taskset -c 0 python benchmarks/search_speed.py --layers 46 --ops 197 --k 100 --json

Builds a seeded synthetic instance shaped like a real LUT and fitness table (teacher op: loss 0,
cost t_i; the others cheaper and lossier with noise, so many are dominated), then times:

* ours: `compressor.search.solve(..., solver="highs")`, K diverse solutions, each proven optimal
  (`--solver gurobi`: the same search with Gurobi in process, needs gurobipy);
* the plain baseline: a PuLP model with every op, rebuilt for every k, solved by CBC; capped at
  `--baseline-k` solutions and extrapolated to K (said so in the output);
* NSGA-II (`compressor.evolution.nsga2`) on the same instance, given the same seconds as ours.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import pulp

from compressor.evolution import nsga2
from compressor.search import solve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: see tests/
from tests.instances import as_arrays, make_instance  # noqa: E402  (one seeded generator)

__all__ = ["make_instance", "as_arrays", "baseline", "main"]


def baseline(
    a, b, budget_ms: float, k: int, overlap: float = 0.7, time_limit: float = 600.0
) -> tuple[list[float], list[float], str | None]:
    """The plain way: rebuild the full PuLP model for every k and solve it with CBC.

    CBC gets the same exactness settings as ours (gap 0 and a tiny cutoff increment: with its
    default increment CBC reports worse solutions as optimal on this instance).

    Returns:
        The objectives proven optimal, the seconds each took, and why it stopped early (None if
        it did not).
    """
    n = len(a)
    limit = math.floor(overlap * n + 1e-9)
    solver = pulp.PULP_CBC_CMD(msg=False, threads=1, gapRel=0.0, gapAbs=1e-10,
                               timeLimit=time_limit, options=["increment 1e-10"])
    previous: list[list[str]] = []
    objectives, seconds = [], []
    for s in range(k):
        t0 = time.perf_counter()
        prob = pulp.LpProblem("hant", pulp.LpMinimize)
        z = {(i, op): pulp.LpVariable(f"z_{i}_{j}", cat="Binary")
             for i in range(n) for j, op in enumerate(sorted(a[i]))}
        prob += pulp.lpSum(a[i][op] * v for (i, op), v in z.items())
        prob += pulp.lpSum(b[i][op] * v for (i, op), v in z.items()) <= budget_ms
        for i in range(n):
            prob += pulp.lpSum(v for (li, _), v in z.items() if li == i) == 1
        for p, choices in enumerate(previous):
            prob += pulp.lpSum(z[(i, c)] for i, c in enumerate(choices)) <= limit, f"ov{p}"
        prob.solve(solver)
        spent = time.perf_counter() - t0
        if prob.sol_status != pulp.LpSolutionOptimal:
            why = (f"solution {s + 1} not proven optimal within {time_limit:g} s "
                   f"({spent:.1f} s spent)")
            return objectives, seconds, why
        choices = [next(op for op in sorted(a[i]) if (z[(i, op)].value() or 0) > 0.5)
                   for i in range(n)]
        previous.append(choices)
        objectives.append(sum(a[i][c] for i, c in enumerate(choices)))
        seconds.append(spent)
    return objectives, seconds, None


def _within(sols, seconds: float) -> int:
    """How many solutions, all proven optimal, the search had after `seconds`."""
    spent, count = 0.0, 0
    for s in sols:
        spent += s.seconds
        if spent > seconds or s.status != "optimal":
            break
        count += 1
    return count


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=46)
    p.add_argument("--ops", type=int, default=197)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--overlap", type=float, default=0.7)
    p.add_argument("--speedup", type=float, default=0.5, help="budget / teacher layers' latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", default="highs")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per solution")
    p.add_argument("--gap", type=float, default=0.0,
                   help="relative gap the solver may stop at (0: prove every optimum)")
    p.add_argument("--total-time-limit", type=float, default=None, help="seconds for all K")
    p.add_argument("--nsga2-seconds", type=float, default=None,
                   help="NSGA-II's time (default: the seconds the integer program took)")
    p.add_argument("--baseline-k", type=int, default=10,
                   help="baseline solutions to time (extrapolated to --k); 0 skips it")
    p.add_argument("--goal-seconds", type=float, default=5.0)
    p.add_argument("--no-nsga2", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="log every solution to stderr")
    args = p.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

    a, b = make_instance(args.layers, args.ops, args.seed)
    teacher = sum(x["teacher"] for x in b)
    budget = args.speedup * teacher
    t0 = time.perf_counter()
    sols = solve(a, b, budget, k=args.k, overlap=args.overlap, solver=args.solver,
                 time_limit=args.time_limit, total_time_limit=args.total_time_limit, gap=args.gap)
    seconds = time.perf_counter() - t0
    out = {
        "layers": args.layers, "ops": args.ops, "speedup": args.speedup, "seed": args.seed,
        "solver": args.solver, "gap": args.gap, "k": args.k, "solutions": len(sols),
        "all_optimal": len(sols) == args.k and all(s.status == "optimal" for s in sols),
        "statuses": {st: sum(s.status == st for s in sols) for st in {s.status for s in sols}},
        "seconds": round(seconds, 3),
        "first_solution_seconds": round(sols[0].seconds, 4),
        "max_solution_seconds": round(max(s.seconds for s in sols), 4),
        "seconds_per_solution": [round(s.seconds, 3) for s in sols],
        "nodes_per_solution": [s.nodes for s in sols],  # branch-and-bound nodes (None: PuLP)
        f"optimal_within_{args.goal_seconds:g}s": _within(sols, args.goal_seconds),
        "objective_first": sols[0].objective, "objective_last": sols[-1].objective,
        # proven relative gap of the worst solution (0 when all are optimal; None: one has none)
        "max_gap": None if any(s.gap is None for s in sols) else max(s.gap for s in sols),
    }
    if args.baseline_k > 0:
        kb = min(args.baseline_k, args.k)
        objs, base, why = baseline(a, b, budget, kb, args.overlap, args.time_limit)
        m = len(objs)
        ours = sum(s.seconds for s in sols[:m])
        out.update({
            "baseline_solutions_timed": m,
            "baseline_seconds_timed": round(sum(base), 3),
            "baseline_seconds_per_solution": [round(x, 3) for x in base],
            "baseline_stopped": why,
            "baseline_seconds": round(sum(base) * args.k / max(1, m), 3),
            "baseline_extrapolated": m < args.k,
            "baseline_same_objectives": all(
                abs(x - s.objective) <= 1e-9 * max(1.0, abs(x)) for x, s in zip(objs, sols)),
            "seconds_first_timed": round(ours, 3),
            # like for like: the same first solutions, baseline seconds / ours
            "ratio": round(sum(base) / ours, 2) if ours > 0 else None,
        })
        if m < args.k:
            out["baseline_note"] = (f"baseline timed for its first {m} solutions; "
                                    "baseline_seconds scales that linearly to k (a lower bound: "
                                    "later k are harder); ratio compares the same first "
                                    f"{m} solutions")
    if not args.no_nsga2:
        ip = sols[0].objective
        out["ip_first_objective"] = ip
        total = args.nsga2_seconds if args.nsga2_seconds is not None else seconds
        for name, given in (("at_first_solution_time", sols[0].seconds), ("at_total_time", total)):
            t1 = time.perf_counter()
            front = nsga2(a, b, budget, seed=args.seed, time_limit=given, generations=10**6)
            best = front[0].objective if front else None
            out[f"nsga2_{name}"] = {
                "seconds": round(time.perf_counter() - t1, 3),
                "best_objective": best,
                "gap_to_ip_optimum_pct": None if best is None else round(100 * (best - ip) / ip, 2),
                "front_size": len(front),
                "ip_solutions_better": None if best is None
                else sum(s.objective < best for s in sols),
            }
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:28s} {value}")
    return out


if __name__ == "__main__":
    main()
