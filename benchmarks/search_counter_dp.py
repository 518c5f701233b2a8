"""An exact dynamic program for Eq. 4 over overlap counters: an independent check and a measurement.

    taskset -c 0 python -m benchmarks.search_counter_dp --k 7 --json

Solution k of Eq. 4 must differ from every earlier solution in at least N - O layers. Going
through the layers in order, the only thing the future needs to know about a partial choice is,
per earlier solution, how many more layers must still differ from it (the "counters"), plus its
loss and latency so far. A dynamic program over those counters is exact; it merges every partial
choice that reaches the same counters, however many ways there are to reach them (which layers
changed, with which ops), which is what makes a branch and bound slow on this problem.

Three passes per k:

1. forward, with the budget priced in by a Lagrange multiplier (lam from the budget-only
   problem): the counter states each layer can reach, pruned by a cheap lower bound against an
   upper bound on the optimum;
2. backward over those states: the exact least priced cost to finish from each, with every
   overlap row exact. Its value at the start is a lower bound on the optimum that keeps all
   overlap rows exact and relaxes only the budget (`lagrangian_bound`);
3. forward again with (loss, latency) Pareto labels per state, pruned by that cost to go: the
   exact optimum, budget included.

`counter_dp` is exact for any upper bound that is at least the optimum (infinity included), so
on small instances it checks the shipped HiGHS path beyond what brute force reaches
(tests/test_search.py). The command measures it at paper scale, given each k's optimum (from
HiGHS) as the upper bound, the most favourable case for its pruning: how many counter states and
labels it needs, the seconds, and the lower bound of pass 2 against the optimum.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from benchmarks.search_speed import as_arrays, make_instance
from compressor.search import solve

__all__ = ["counter_dp", "main"]


def _budget_multiplier(a: list[np.ndarray], b: list[np.ndarray], budget: float) -> float:
    """The smallest lam >= 0 whose per-layer argmin of a + lam * b meets the budget."""

    def latency(lam: float) -> float:
        return sum(float(bi[np.argmin(ai + lam * bi)]) for ai, bi in zip(a, b))

    if latency(0.0) <= budget:
        return 0.0
    lo, hi = 0.0, 1.0
    while latency(hi) > budget:
        lo, hi = hi, hi * 4.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if latency(mid) > budget else (lo, mid)
    return hi


def _options(a_i, b_i, rows_i, keep) -> list[tuple[float, float, tuple[int, ...], int]]:
    """The ops of one layer worth trying: (loss, latency, differs-from-earlier vector, op).

    An op is dropped when another is at least as good in loss and latency and differs from at
    least the same earlier solutions (it can replace it in any solution); ties keep the first.
    """
    cand = [(float(a_i[j]), float(b_i[j]), tuple(int(r != j) for r in rows_i), int(j))
            for j in np.flatnonzero(keep)]
    out = []
    for c in cand:
        dominated = any(
            d[0] <= c[0] and d[1] <= c[1] and all(x >= y for x, y in zip(d[2], c[2]))
            and (d[:3] != c[:3] or d[3] < c[3])
            for d in cand if d is not c
        )
        if not dominated:
            out.append(c)
    return out


def counter_dp(
    a: list[np.ndarray],
    b: list[np.ndarray],
    budget: float,
    earlier: list[list[int]],
    limit: int,
    upper: float = math.inf,
) -> dict:
    """The exact optimum of Eq. 4 given the earlier solutions (op index per layer).

    Args:
        a, b: per layer, the loss and latency of every op.
        budget: latency budget.
        earlier: the earlier solutions; the new one may share at most `limit` layers with each.
        limit: O, the overlap allowed.
        upper: an upper bound on the optimum (any value at least the optimum keeps it exact).

    Returns:
        objective and choice (None when nothing is feasible below `upper`), lagrangian_bound
        (pass 2's lower bound), states (counter states over all layers, pass 1) and labels
        (Pareto labels over all layers, pass 3).
    """
    n = len(a)
    need = n - limit
    start = tuple([need] * len(earlier))
    tol = 1e-9 * (1.0 + abs(upper)) if math.isfinite(upper) else 0.0
    lam = _budget_multiplier(a, b, budget)
    priced = [ai + lam * bi for ai, bi in zip(a, b)]
    floor = np.array([float(p.min()) for p in priced])
    # a cheap bound for pass 1: the Lagrangian of the layers left, plus, for the tightest
    # counter alone, its cheapest way to differ in as many more layers as it still needs
    rest = np.concatenate([np.cumsum(floor[::-1])[::-1], [0.0]])
    rest_latency = np.concatenate([np.cumsum([float(x.min()) for x in b][::-1])[::-1], [0.0]])
    extra = np.full((len(earlier), n + 1, need + 1), math.inf)
    for m, row in enumerate(earlier):
        penalty = np.zeros(n)
        for i, j in enumerate(row):
            if priced[i][j] <= floor[i]:  # staying on it is free; differing costs the next best
                penalty[i] = float(np.delete(priced[i], j).min(initial=math.inf)) - floor[i]
        for t in range(n + 1):
            s = np.sort(penalty[t:])[:need]
            extra[m, t, : len(s) + 1] = np.concatenate([[0.0], np.cumsum(s)])

    def cheap_bound(t: int, state: tuple[int, ...]) -> float:
        return rest[t] + max((extra[m, t, r] for m, r in enumerate(state)), default=0.0)

    keep = [np.ones(len(x), dtype=bool) for x in a]
    if math.isfinite(upper):  # ops whose budget-only Lagrangian bound exceeds `upper` cannot help
        base = float(floor.sum()) - lam * budget
        keep = [base + (p - floor[i]) <= upper + tol for i, p in enumerate(priced)]
    options = [_options(a[i], b[i], [r[i] for r in earlier], keep[i]) for i in range(n)]

    def step(state, differs):
        return tuple(max(0, s - d) for s, d in zip(state, differs))

    # pass 1: reachable counter states
    layers = [{start: 0.0}]
    for t in range(n):
        nxt: dict[tuple[int, ...], float] = {}
        for state, g in layers[-1].items():
            for oa, ob, differs, _ in options[t]:
                s = step(state, differs)
                if max(s, default=0) > n - t - 1:
                    continue
                v = g + oa + lam * ob
                if v + cheap_bound(t + 1, s) - lam * budget > upper + tol:
                    continue
                if v < nxt.get(s, math.inf):
                    nxt[s] = v
        layers.append(nxt)
    # pass 2: exact priced cost to go, every overlap row exact
    togo: list[dict] = [{} for _ in range(n + 1)]
    togo[n] = {s: (0.0 if not any(s) else math.inf) for s in layers[n]}
    for t in range(n - 1, -1, -1):
        for state in layers[t]:
            togo[t][state] = min(
                (oa + lam * ob + togo[t + 1].get(step(state, d), math.inf)
                 for oa, ob, d, _ in options[t]), default=math.inf)
    bound = togo[0].get(start, math.inf) - lam * budget
    # pass 3: (loss, latency) Pareto labels, pruned by the exact cost to go
    labels: dict[tuple[int, ...], list[tuple[float, float, tuple[int, ...]]]] = {
        start: [(0.0, 0.0, ())]}
    total = 0
    for t in range(n):
        nxt_labels: dict[tuple[int, ...], list] = {}
        for state, pts in labels.items():
            for oa, ob, differs, j in options[t]:
                s = step(state, differs)
                go = togo[t + 1].get(s, math.inf)
                if go == math.inf:
                    continue
                for la, lb, ch in pts:
                    na, nb = la + oa, lb + ob
                    if nb + rest_latency[t + 1] > budget + 1e-9:
                        continue
                    if na + lam * nb + go - lam * budget > upper + tol:
                        continue
                    nxt_labels.setdefault(s, []).append((na, nb, ch + (j,)))
        for s, pts in nxt_labels.items():  # keep the Pareto front per state
            pts.sort()
            front, best_b = [], math.inf
            for p in pts:
                if p[1] < best_b:
                    front.append(p)
                    best_b = p[1]
            nxt_labels[s] = front
        labels = nxt_labels
        total += sum(len(v) for v in labels.values())
    done = [p for p in labels.get(tuple([0] * len(earlier)), []) if p[0] <= upper + tol]
    best = min(done, default=None)
    return {
        "objective": None if best is None else best[0],
        "choice": None if best is None else list(best[2]),
        "lagrangian_bound": bound,
        "states": sum(len(x) for x in layers),
        "labels": total,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=46)
    p.add_argument("--ops", type=int, default=197)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--overlap", type=float, default=0.7)
    p.add_argument("--speedup", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    a_d, b_d = make_instance(args.layers, args.ops, args.seed)
    budget = args.speedup * sum(x["teacher"] for x in b_d)
    names, a, b = as_arrays(a_d, b_d)
    limit = math.floor(args.overlap * args.layers + 1e-9)
    t0 = time.perf_counter()
    sols = solve(a_d, b_d, budget, k=args.k, overlap=args.overlap, solver="highs",
                 time_limit=600.0)
    highs_seconds = time.perf_counter() - t0
    idx = [[names[i].index(c) for i, c in enumerate(s.choices)] for s in sols]
    rows = []
    for k, sol in enumerate(sols, start=1):
        t1 = time.perf_counter()
        r = counter_dp(a, b, budget, idx[: k - 1], limit, upper=sol.objective)
        rows.append({
            "k": k, "highs_status": sol.status, "highs_seconds": round(sol.seconds, 3),
            "dp_seconds": round(time.perf_counter() - t1, 3), "states": r["states"],
            "labels": r["labels"],
            "same_optimum": r["objective"] is not None
            and abs(r["objective"] - sol.objective) <= 1e-9 * max(1.0, abs(sol.objective)),
            "optimum": sol.objective,
            "lagrangian_bound_gap_pct": round(
                100 * (sol.objective - r["lagrangian_bound"]) / sol.objective, 4),
        })
    out = {"layers": args.layers, "ops": args.ops, "k": args.k, "seed": args.seed,
           "highs_seconds": round(highs_seconds, 3), "per_k": rows}
    if args.json:
        print(json.dumps(out))
    else:
        for row in rows:
            print(row)
    return out


if __name__ == "__main__":
    main()
