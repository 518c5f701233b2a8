"""Why proving the diverse optima is hard: the LP gap per k and what it leaves open.

    taskset -c 0 python -m benchmarks.search_lp_gap --k 30 --at 2,7,20,30 --json

Solves the paper-scale instance of `search_speed.py` exactly (the shipped HiGHS path), then for
each k in --at solves the LP relaxation of the same problem (all ops, the k-1 earlier solutions'
overlap rows) and prints the LP bound, the gap to the k-th optimum, how many ops per layer have
an LP reduced cost within that gap (log10 of their product: the space a proof must rule out),
how many of those are exact clones (same loss and latency as another op of the layer), how many
layers the k-th optimum changes from the first, and how many overlap rows it meets with equality.
"""

from __future__ import annotations

import argparse
import json
import math

import highspy
import numpy as np

from benchmarks.search_speed import as_arrays, make_instance
from compressor.search import solve


def lp_bound(a: np.ndarray, b: np.ndarray, budget: float, rows: list[list[int]], limit: int):
    """The LP relaxation's value and reduced costs (n x m) over every op."""
    n, m = a.shape
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    inf = highspy.kHighsInf
    cols = np.arange(n * m, dtype=np.int32)
    h.addVars(n * m, np.zeros(n * m), np.ones(n * m))
    h.changeColsCost(n * m, cols, a.ravel())
    for i in range(n):
        h.addRow(1, 1, m, cols[i * m:(i + 1) * m], np.ones(m))
    h.addRow(-inf, budget, n * m, cols, b.ravel())
    for row in rows:
        h.addRow(-inf, limit, n, np.array([i * m + j for i, j in enumerate(row)], np.int32),
                 np.ones(n))
    h.run()
    return h.getInfo().objective_function_value, np.asarray(h.getSolution().col_dual).reshape(n, m)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=46)
    p.add_argument("--ops", type=int, default=197)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speedup", type=float, default=0.5)
    p.add_argument("--overlap", type=float, default=0.7)
    p.add_argument("--k", type=int, default=30, help="exact solutions to compute")
    p.add_argument("--at", default="2,7,20,30", help="the k to analyse (comma-separated)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    a_d, b_d = make_instance(args.layers, args.ops, args.seed)
    names, a, b = as_arrays(a_d, b_d)
    budget = args.speedup * sum(x["teacher"] for x in b_d)
    n = len(names)
    limit = math.floor(args.overlap * n + 1e-9)
    sols = solve(a_d, b_d, budget, k=args.k, overlap=args.overlap, solver="highs",
                 time_limit=600)
    x = [[names[i].index(c) for i, c in enumerate(s.choices)] for s in sols]
    clone = np.zeros(a.shape, dtype=bool)
    for i in range(n):
        pairs = list(zip(a[i], b[i]))
        clone[i] = [pairs.count(v) > 1 for v in pairs]
    out = []
    for k in (int(v) for v in args.at.split(",")):
        if k > len(sols):
            break
        value, rc = lp_bound(a, b, budget, x[:k - 1], limit)
        gap = sols[k - 1].objective - value
        within = rc <= gap + 1e-12
        out.append({
            "k": k, "status": sols[k - 1].status, "optimum": sols[k - 1].objective,
            "lp_bound": value, "gap": gap, "gap_pct": 100 * gap / sols[k - 1].objective,
            "log10_candidates": float(np.log10(within.sum(axis=1)).sum()),
            "layers_with_10_plus": int((within.sum(axis=1) >= 10).sum()),
            "clones_among_candidates": int((within & clone).sum()),
            "candidates": int(within.sum()),
            "layers_changed_from_first": sum(u != v for u, v in zip(x[k - 1], x[0])),
            "tight_overlap_rows": sum(
                sum(u == v for u, v in zip(x[k - 1], row)) == limit for row in x[:k - 1]),
        })
    if args.json:
        print(json.dumps(out))
    else:
        for row in out:
            print(row)
    return out


if __name__ == "__main__":
    main()
