"""Phase 2 (HANT Eq. 4): K diverse solutions of the integer program, then candidate evaluation.

    min_z  sum_i a_i^T z_i
    s.t.   sum_i b_i^T z_i <= B - stem - head,   1^T z_i = 1 for all i,
           sum_i z_i^T z_i^(k') <= O  for every earlier solution k'

The model is built once; each new solution adds one overlap row (never a rebuild). Exact
speed-ups, none of which can change any of the K optima:

* Ops are left out of the model while they provably cannot be in the next optimum, and join it
  when they might (see `_Pool`): dominated ops (re-admitted once their dominators are used by
  earlier solutions) and ops whose Lagrangian lower bound exceeds a known feasible solution.
* `solver="highs"` drives HiGHS in process (no files, no subprocess): columns and rows are
  appended to the same model; the previous optimum is a valid lower bound on the next one (each
  row only shrinks the feasible set) and goes in as a bound row; the best solution found so far
  that meets every overlap row (HiGHS keeps the improving solutions of every solve) is the MIP
  start.
* The losses are scaled to at most 1000 inside the solvers so that their absolute tolerances
  mean the same whatever the units, well above their internal feasibility tolerances; CBC gets
  a tiny cutoff increment (its default makes it report solutions up to ~1e-4 worse as optimal,
  which happens at paper scale), and a HiGHS "optimal" counts only if its gap is <= 1e-6.

`solver="gurobi"` drives Gurobi in process the same way (optional: `pip install
'hant-compressor[gurobi]'`; the license bundled with gurobipy covers models up to 2000
variables, enough at paper scale because only admitted ops become variables). It proves the
same optima several times faster than HiGHS at paper scale (BENCHMARKS.md), without the bound
row, which slows it down.

`solver="PULP_CBC_CMD"` (CBC, bundled with PuLP) or any other PuLP solver name (e.g. `"HiGHS"`)
goes through PuLP with the same reductions. Every solution records its status: `optimal`
(proven within 1e-9 x the largest |a_ij|), `feasible` (found, not proven) or `time-limited`.

What costs time: the LP relaxation contains the average of the earlier solutions, which meets
every overlap row, so for larger k the LP bound is no better than the previous optimum and the
solver has to branch to prove each new one; the proof gets harder as k grows (HANT's table 3:
top-100 takes minutes, top-500 hours).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ._errors import InfeasibleError, SearchError
from .recipe import SearchCfg  # the one source of the defaults
from .solvers import ABS_GAP as _ABS_GAP
from .solvers import SOLVERS, _Gurobi, _Highs, _Pulp, check_solver

__all__ = [
    "Solution",
    "solve",
    "min_latency",
    "fastest_speedup",
    "kendall_tau",
    "check_solver",
    "SOLVERS",
]

_logger = logging.getLogger(__name__)

_SCALE = 1000.0  # the solvers see losses scaled to at most this in magnitude


@dataclass
class Solution:
    choices: list[str]
    objective: float  # sum of a_ij over the chosen ops (predicted loss change)
    latency_ms: float  # LUT sum over layers (stem and head excluded)
    status: str  # optimal | feasible | time-limited
    seconds: float = 0.0  # solver wall time spent on this solution
    bound: float | None = None  # proven lower bound on this k's optimum (None: unknown)
    nodes: int | None = None  # branch-and-bound nodes the solver used (None: not reported)

    @property
    def gap(self) -> float | None:
        """Proven relative gap to this k's optimum: 0 when optimal, None when unknown."""
        if self.bound is None:
            return None
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), 1e-12)

    def to_dict(self) -> dict:
        return {"choices": self.choices, "objective": self.objective,
                "latency_ms": self.latency_ms, "status": self.status,
                "seconds": self.seconds, "bound": self.bound, "gap": self.gap,
                "nodes": self.nodes}


def min_latency(b: list[dict[str, float]]) -> float:
    """Latency of the fastest op in every layer (the least any architecture can cost)."""
    return sum(min(layer.values()) for layer in b)


def fastest_speedup(b: list[dict[str, float]], teacher_ms: float, fixed_ms: float = 0.0) -> float:
    """The smallest reachable speedup (student / teacher latency) with these ops.

    Args:
        b: per layer, op name -> latency in ms.
        teacher_ms: the teacher's predicted latency (stem and head included).
        fixed_ms: what every student pays besides the layers (stem + head).
    """
    return (min_latency(b) + fixed_ms) / teacher_ms


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b rank correlation of two equally long sequences (nan if undefined).

    Used to report how well the integer program's objective ranks the evaluated losses.
    """
    from scipy.stats import kendalltau

    if len(x) != len(y):
        raise ValueError(f"kendall_tau needs sequences of equal length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    return float(kendalltau(x, y).statistic)


class _Pool:
    """Which ops of each layer the model must hold for the next solution to stay exact.

    Two exact reductions decide it; an op joins the model once neither excludes it, and stays.

    Dominance. Write j' > j when op j' is at least as good as op j in loss and latency
    (a_j' <= a_j and b_j' <= b_j), ties broken by op order so that > is a strict partial order.
    Let U_i be the ops that earlier solutions chose in layer i. Op j is excluded while some
    j' > j is not in U_i. Why this is exact: take any optimal solution z of the full problem (all
    ops, the current overlap rows). If z picks an excluded op j in layer i, some j' > j is not in
    U_i; if j' is excluded too, it has some j'' > j' not in U_i, and so on; the chain ends (> is
    a strict order on finitely many ops) at a non-excluded op j* > j that is not in U_i. Swapping
    j for j* keeps loss and latency at most as high and adds no overlap with any earlier
    solution, since none of them chose j* in layer i. So the reduced problem has the same
    optimum. U_i only grows, so an op once needed stays needed; ops of U_i are never swapped for
    each other (that could break an overlap row), which is why dominated ops come back.

    Bound. For any lam >= 0, L(lam) + r_ij is a lower bound on the objective of every
    solution that picks op j in layer i, where L is the Lagrangian bound of the budget row and
    r_ij = a_ij + lam b_ij - min_j' (a_ij' + lam b_ij') (drop the overlap rows, relax the budget).
    Given a feasible solution of value T (the best one found so far that meets every overlap
    row), ops with bound > T cannot be in any solution better than it and are excluded. Both
    reductions commute: j' > j implies r_ij' <= r_ij, so the swap above never brings in an op
    the bound excludes.
    """

    def __init__(self, a: list[dict[str, float]], b: list[dict[str, float]], budget_ms: float):
        self.names = [sorted(layer) for layer in a]
        # the solvers see losses scaled to at most _SCALE in magnitude, so that their absolute
        # tolerances mean the same whatever the units of a, and sit well above their internal
        # feasibility tolerances (~1e-7)
        top = max((abs(v) for layer in a for v in layer.values()), default=0.0)
        self.scale = top / _SCALE if top > 0 else 1.0
        self.a = [np.array([a[i][op] / self.scale for op in ops], dtype=float)
                  for i, ops in enumerate(self.names)]
        self.b = [np.array([b[i][op] for op in ops], dtype=float)
                  for i, ops in enumerate(self.names)]
        self.dom = []  # dom[i][p, q]: op p > op q in layer i
        for ai, bi in zip(self.a, self.b):
            m = len(ai)
            weak = (ai[:, None] <= ai[None, :]) & (bi[:, None] <= bi[None, :])
            equal = (ai[:, None] == ai[None, :]) & (bi[:, None] == bi[None, :])
            earlier = np.arange(m)[:, None] < np.arange(m)[None, :]
            self.dom.append(weak & (~equal | earlier))
        self.used = [np.zeros(len(x), dtype=bool) for x in self.a]
        self.in_model = [np.zeros(len(x), dtype=bool) for x in self.a]
        self.bound, self.greedy = _op_bounds(self.a, self.b, budget_ms)

    def admit(self, threshold: float = math.inf) -> list[tuple[int, int]]:
        """The (layer, op) pairs neither reduction excludes at `threshold` and not yet in."""
        new = []
        tol = 1e-9 * (1.0 + abs(threshold)) if math.isfinite(threshold) else 0.0
        for i, (dom, used, have) in enumerate(zip(self.dom, self.used, self.in_model)):
            need = ~dom[~used].any(axis=0) & (self.bound[i] <= threshold + tol)
            new.extend((i, int(j)) for j in np.flatnonzero(need & ~have))
            have |= need
        return new

    def include(self, idx: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
        """Ops of a given solution that are not in the model yet (they join it)."""
        new = [(i, j) for i, j in enumerate(idx) if not self.in_model[i][j]]
        for i, j in new:
            self.in_model[i][j] = True
        return new

    def use(self, idx: list[int]) -> None:
        for i, j in enumerate(idx):
            self.used[i][j] = True

    def objective(self, idx) -> float:
        """The scaled objective of a solution (op index per layer)."""
        return float(sum(self.a[i][j] for i, j in enumerate(idx)))

    def size(self) -> int:
        return int(sum(k.sum() for k in self.in_model))


def _op_bounds(
    a: list[np.ndarray], b: list[np.ndarray], budget_ms: float
) -> tuple[list[np.ndarray], list[int] | None]:
    """Per op, a lower bound on every solution that picks it: L(lam) + reduced cost (see _Pool).

    lam is found by bisection on the subgradient of the Lagrangian dual; any lam >= 0 gives a
    valid bound, a good one a tight one. Also returns the Lagrangian pick at the upper end of the
    bisection, a feasible solution (None if there is none), the first solve's MIP start.
    """

    def pick(lam):
        return [int(np.argmin(ai + lam * bi)) for ai, bi in zip(a, b)]

    def slack(lam):
        return sum(bi[j] for bi, j in zip(b, pick(lam))) - budget_ms

    lo, hi = 0.0, 1.0
    if slack(0.0) > 0:
        while slack(hi) > 0 and hi < 1e12:
            lo, hi = hi, hi * 4.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if slack(mid) > 0 else (lo, mid)
    else:
        hi = 0.0
    best = None
    for lam in (lo, hi):  # the dual optimum lies between; take the better bound
        cost = [ai + lam * bi for ai, bi in zip(a, b)]
        value = sum(float(c.min()) for c in cost) - (lam * budget_ms if lam else 0.0)
        if best is None or value > best[0]:
            best = (value, cost)
    value, cost = best
    greedy = pick(hi)
    feasible = sum(bi[j] for bi, j in zip(b, greedy)) <= budget_ms
    return [value + (c - c.min()) for c in cost], (greedy if feasible else None)


def _check(a, b, budget_ms, k, overlap, teacher_ms, fixed_ms) -> None:
    if len(a) != len(b) or any(set(x) != set(y) for x, y in zip(a, b)):
        raise SearchError("a and b must list the same ops for the same layers")
    if not a or any(not layer for layer in a):
        raise SearchError("every layer needs at least one candidate op")
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    if not 0 < overlap <= 1:
        raise SearchError(f"overlap must be in (0, 1], got {overlap}")
    floor_ms = min_latency(b)
    if budget_ms < floor_ms - 1e-9:
        msg = (f"the layers' latency budget {budget_ms:.3f} ms is below the fastest reachable "
               f"{floor_ms:.3f} ms (every layer on its fastest op)")
        if teacher_ms:
            s = fastest_speedup(b, teacher_ms, fixed_ms)
            msg += f"; the fastest reachable speedup is {s:.4f}: ask for at least that"
        else:
            msg += "; raise the budget or add faster ops to the pool"
        raise InfeasibleError(msg)


def solve(
    a: list[dict[str, float]],
    b: list[dict[str, float]],
    budget_ms: float,
    k: int = SearchCfg.k,
    overlap: float = SearchCfg.overlap,
    solver: str = SearchCfg.solver,
    time_limit: float = SearchCfg.time_limit,
    teacher_ms: float | None = None,
    fixed_ms: float = 0.0,
    total_time_limit: float | None = SearchCfg.total_time_limit,
    gap: float = SearchCfg.gap,
) -> list[Solution]:
    """Up to `k` solutions, each overlapping every earlier one in at most floor(overlap*N) layers.

    Solution k is optimal for Eq. 4 with the overlap rows of solutions 1..k-1 (when its status
    says `optimal`). Fewer than `k` come back when no further diverse solution exists, or when
    the solver finds none within the time limit.

    Args:
        a: per layer, op name -> fitness (loss change; lower is better).
        b: per layer, op name -> latency in ms (same keys as `a`).
        budget_ms: latency budget for the layers (stem and head already subtracted).
        k: number of solutions (K in the paper).
        overlap: O as a fraction of the number of layers N.
        solver: "highs" (HiGHS in process, the default), "gurobi" (Gurobi in process, faster;
            needs gurobipy), "PULP_CBC_CMD" (CBC through PuLP) or any other available PuLP
            solver name (e.g. "HiGHS", PuLP's own HiGHS interface).
        time_limit: seconds per solution.
        teacher_ms: the teacher's predicted latency; only used to state the fastest reachable
            speedup when the budget is infeasible.
        fixed_ms: stem + head latency (with `teacher_ms`, for that message).
        total_time_limit: stop looking for more solutions after this many seconds in all (the
            last one gets what is left, and is `time-limited` if that stops it).
        gap: relative optimality gap at which the solver may stop (0: prove every optimum). A
            solution is `optimal` only if proven within 1e-9 x the largest |a_ij|;
            one accepted within a larger gap is `feasible`.

    Returns:
        The solutions in the order found (objectives non-decreasing while all are optimal).

    Raises:
        InfeasibleError: the budget is below `min_latency(b)`.
        SearchError: bad input, unknown solver, or no first solution within the time limit.
    """
    _check(a, b, budget_ms, k, overlap, teacher_ms, fixed_ms)
    if not 0 <= gap < 1:
        raise SearchError(f"gap must be in [0, 1), got {gap}")
    n = len(a)
    limit = math.floor(overlap * n + 1e-9)
    pool = _Pool(a, b, budget_ms)
    if solver == "highs":
        model = _Highs(pool, budget_ms, time_limit, gap)
    elif solver == "gurobi":
        model = _Gurobi(pool, budget_ms, time_limit, gap)
    else:
        model = _Pulp(pool, budget_ms, solver, time_limit, gap)
    seen = _Incumbents(pool, budget_ms)
    if pool.greedy is not None:
        seen.add([pool.greedy])
    out: list[Solution] = []
    began = time.perf_counter()
    for s in range(k):
        t0 = time.perf_counter()
        if total_time_limit is not None:
            left = total_time_limit - (t0 - began)
            if left <= 0 and out:
                _logger.info("stopped after %d solutions: total time limit", s)
                break
            model.set_time_limit(max(0.01, min(time_limit, left)))
        status, idx = _next_solution(model, pool, seen)
        elapsed = time.perf_counter() - t0
        if idx is None:
            if s == 0:
                if status == "time-limited":
                    raise SearchError(f"no solution found within time_limit={time_limit} s; "
                                      "raise the time limit")
                raise SearchError(f"the integer program is {status}")
            _logger.info("stopped after %d solutions: %s", s, status)
            break
        choices = [pool.names[i][j] for i, j in enumerate(idx)]
        objective = float(sum(a[i][c] for i, c in enumerate(choices)))
        bound = model.bound  # the solver's proven lower bound on this k's optimum, scaled
        if status == "optimal":
            bound = objective
        elif bound is not None and math.isfinite(bound):
            bound = min(objective, bound * pool.scale)
        else:
            bound = None
        out.append(Solution(
            choices,
            objective,
            float(sum(b[i][c] for i, c in enumerate(choices))),
            status,
            elapsed,
            bound,
            model.nodes,
        ))
        _logger.info("solution %d: %s, objective %.9g, %.3f s, %s nodes, %d ops in the model",
                     s + 1, status, out[-1].objective, elapsed, model.nodes, pool.size())
        if status == "optimal":
            model.lower_bound(pool.objective(idx))
        pool.use(idx)
        model.add_overlap(idx, limit)
        seen.cut(idx, limit)
    _logger.info("%d solutions with %d of %d ops in the model", len(out), pool.size(),
                 sum(len(x) for x in a))
    return out


class _Incumbents:
    """Every solution a solver has found so far, and which of them meet every overlap row."""

    def __init__(self, pool: _Pool, budget_ms: float):
        self.pool, self.budget = pool, budget_ms
        self.x = np.zeros((0, len(pool.a)), dtype=np.int64)
        self.value = np.zeros(0)
        self.ok = np.zeros(0, dtype=bool)
        self.rows: list[np.ndarray] = []
        self.limit = len(pool.a)

    def add(self, solutions: list[list[int]]) -> None:
        known = {tuple(r) for r in self.x.tolist()}
        new = [x for x in {tuple(x) for x in solutions} - known
               if sum(self.pool.b[i][j] for i, j in enumerate(x)) <= self.budget]
        if not new:
            return
        x = np.array(new, dtype=np.int64)
        ok = np.ones(len(x), dtype=bool)
        for row in self.rows:
            ok &= (x == row).sum(axis=1) <= self.limit
        self.x = np.vstack([self.x, x])
        self.value = np.concatenate([self.value, [self.pool.objective(r) for r in new]])
        self.ok = np.concatenate([self.ok, ok])

    def cut(self, idx: list[int], limit: int) -> None:
        row = np.array(idx, dtype=np.int64)
        self.rows.append(row)
        self.limit = limit
        self.ok &= (self.x == row).sum(axis=1) <= limit

    def best(self) -> tuple[tuple[int, ...], float] | None:
        if not self.ok.any():
            return None
        r = int(np.flatnonzero(self.ok)[np.argmin(self.value[self.ok])])
        return tuple(int(v) for v in self.x[r]), float(self.value[r])


def _next_solution(model, pool: _Pool, seen: _Incumbents) -> tuple[str, list[int] | None]:
    """Solve for the next solution with the smallest model that provably keeps it optimal."""
    start = seen.best()
    threshold = start[1] if start else math.inf
    model.add_ops(pool.admit(threshold))
    if start:
        model.add_ops(pool.include(start[0]))
        model.start(start[0])
    status, idx, found = model.run()
    seen.add(found + ([idx] if idx else []))
    if math.isfinite(threshold) and (
        status == "infeasible"
        or (status == "optimal" and pool.objective(idx) > threshold + _ABS_GAP)
    ):
        # cannot happen in exact arithmetic (the start is in the model); stay exact regardless
        _logger.warning("bound reduction cut off the optimum; solving with every needed op")
        model.add_ops(pool.admit())
        status, idx, found = model.run()
        seen.add(found + ([idx] if idx else []))
    return status, idx
