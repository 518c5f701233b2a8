"""Evolutionary alternative to the integer program: NSGA-II over the same choice space.

As in DONNA (Moons et al.) and DONNAv2: a genome picks one op per layer; the two objectives are
the predicted loss (the sum of the chosen ops' a_ij, DONNAv2's surrogate) and the latency (the
LUT sum, or `latency_fn` measuring the assembled network end to end when the target hardware is
present: DONNA's hardware in the loop). The latency budget is a constraint. Ops of each layer are
ordered by latency, so that neighbouring genes (the variation of SBX and polynomial mutation on
integers) are similar ops.

Unlike the integer program, nothing here is proven optimal: every solution's status is
`feasible`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ._errors import InfeasibleError, SearchError
from .recipe import SearchCfg  # the one source of the defaults
from .search import Solution, min_latency

__all__ = ["nsga2"]


def _problem(a, b, budget_ms, names, latency_fn):
    from pymoo.core.problem import Problem

    n = len(names)
    width = max(len(x) for x in names)
    pad = np.full((n, width), np.inf)
    cost_a, cost_b = pad.copy(), pad.copy()
    for i, ops in enumerate(names):
        cost_a[i, : len(ops)] = [a[i][op] for op in ops]
        cost_b[i, : len(ops)] = [b[i][op] for op in ops]
    rows = np.arange(n)
    cache: dict[tuple[int, ...], float] = {}

    def latency(x: np.ndarray) -> float:
        key = tuple(int(v) for v in x)
        if key not in cache:
            cache[key] = float(latency_fn([names[i][j] for i, j in enumerate(key)]))
        return cache[key]

    class Eq4(Problem):
        def __init__(self):
            super().__init__(n_var=n, n_obj=2, n_ieq_constr=1, xl=np.zeros(n),
                             xu=np.array([len(x) - 1 for x in names], dtype=float), vtype=int)

        def _evaluate(self, x, out, *args, **kwargs):
            x = np.asarray(x).round().astype(int)
            loss = cost_a[rows, x].sum(axis=1)
            if latency_fn is None:
                lat = cost_b[rows, x].sum(axis=1)
            else:
                lat = np.array([latency(row) for row in x])
            out["F"] = np.column_stack([loss, lat])
            out["G"] = (lat - budget_ms)[:, None]

    return Eq4()


def nsga2(
    a: list[dict[str, float]],
    b: list[dict[str, float]],
    budget_ms: float,
    pop_size: int = SearchCfg.pop_size,
    generations: int = SearchCfg.generations,
    seed: int = 0,
    time_limit: float | None = None,
    latency_fn: Callable[[list[str]], float] | None = None,
) -> list[Solution]:
    """The feasible Pareto set (predicted loss vs latency) that NSGA-II finds within the budget.

    Args:
        a: per layer, op name -> fitness (loss change; lower is better).
        b: per layer, op name -> LUT latency in ms (same keys as `a`).
        budget_ms: latency budget, on the scale of the latency objective (the layers' LUT sum,
            stem and head excluded; or whatever `latency_fn` returns).
        pop_size: population size.
        generations: the most generations to run.
        seed: random seed (the run is deterministic for a given seed without a time limit).
        time_limit: stop after this many seconds (checked between generations).
        latency_fn: measures a choice list's latency in ms (hardware in the loop); results are
            cached per architecture. Default: the LUT sum from `b`.

    Returns:
        Non-dominated feasible solutions, lowest objective (predicted loss) first; status
        `feasible`, `latency_ms` = the latency objective.

    Raises:
        InfeasibleError: the budget is below the LUT's fastest architecture.
        SearchError: bad input.
    """
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair

    if len(a) != len(b) or any(set(x) != set(y) for x, y in zip(a, b)) or not a:
        raise SearchError("a and b must list the same ops for the same (non-empty) layers")
    if pop_size < 4 or generations < 1:
        raise SearchError("nsga2 needs pop_size >= 4 and generations >= 1")
    if latency_fn is None and budget_ms < min_latency(b) - 1e-9:
        raise InfeasibleError(
            f"the layers' latency budget {budget_ms:.3f} ms is below the fastest reachable "
            f"{min_latency(b):.3f} ms (every layer on its fastest op)"
        )
    names = [sorted(layer, key=lambda op, i=i: (b[i][op], a[i][op], op))
             for i, layer in enumerate(b)]
    problem = _problem(a, b, budget_ms, names, latency_fn)
    rng = np.random.default_rng(seed)
    upper = np.array([len(x) for x in names])
    start = (rng.random((pop_size, len(names))) * upper).astype(int)
    start[0] = 0  # the fastest architecture: feasible whenever anything is
    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=start,
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    t0 = time.perf_counter()
    while algorithm.has_next():
        algorithm.next()
        if time_limit is not None and time.perf_counter() - t0 >= time_limit:
            break
    pop = algorithm.pop
    x = np.asarray(pop.get("X")).round().astype(int)
    f = np.asarray(pop.get("F"))
    feasible = np.asarray(pop.get("CV")).ravel() <= 0
    points = {}
    for row, (loss, lat), ok in zip(x, f, feasible):
        if ok:
            points[tuple(int(v) for v in row)] = (float(loss), float(lat))
    front = [
        (key, p) for key, p in points.items()
        if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points.values())
    ]
    front.sort(key=lambda kp: (kp[1][0], kp[1][1]))
    out = []
    for key, (_, lat) in front:
        choices = [names[i][j] for i, j in enumerate(key)]
        obj = float(sum(a[i][c] for i, c in enumerate(choices)))
        out.append(Solution(choices, obj, lat, "feasible"))
    return out
