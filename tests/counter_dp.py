"""An exact dynamic program for Eq. 4 over overlap counters: an independent exactness check of
the search beyond brute-force size (tests/test_search.py). It shares no code with the solver.

Solution k of Eq. 4 must differ from every earlier solution in at least N - O layers. Going
through the layers in order, the only thing the future needs to know about a partial choice is,
per earlier solution, how many more layers must still differ from it (the "counters"), plus its
loss and latency so far. A dynamic program over those counters is exact. Its measurement at paper
scale (states grow ~5.6x per k) is in BENCHMARKS.md; the script that measured it is at commit
3c7d7ef (benchmarks/search_counter_dp.py).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["counter_dp"]


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
