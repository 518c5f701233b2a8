"""The MIP back-ends of the search (`compressor.search.solve`): HiGHS and Gurobi in process,
grown by columns (admitted ops) and rows (overlap constraints), and any PuLP solver as one model.
Each exposes the same small interface (`add_ops`, `add_overlap`, `lower_bound`, `start`,
`set_time_limit`, `run`, and `bound` / `nodes` after a run)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import pulp

from ._errors import SearchError

if TYPE_CHECKING:
    from .search import _Pool

__all__ = ["check_solver", "SOLVERS"]

_logger = logging.getLogger(__name__)

#: Solver names `solve` accepts besides any PuLP solver name.
SOLVERS = ("highs", "gurobi", "PULP_CBC_CMD")
ABS_GAP = 1e-6  # "optimal" = proven within this absolute gap of the scaled objective


def _decode(ops: list[tuple[int, int]], values, n: int) -> list[int] | None:
    """The op index per layer of a solver's 0/1 column values (column c is op `ops[c]`), or None
    if some layer has no op chosen."""
    idx = [-1] * n
    for c in np.flatnonzero(np.asarray(values) > 0.5):
        i, j = ops[int(c)]
        idx[i] = j
    return None if -1 in idx else idx


@contextlib.contextmanager
def _c_stdout_to_devnull():
    """Send what C code writes to file descriptor 1 to /dev/null (HiGHS prints its banner when
    a model is created, before any option can turn its output off)."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


class _Highs:
    """Eq. 4 in one in-process HiGHS model, grown by columns (admitted ops) and rows."""

    def __init__(self, pool: _Pool, budget_ms: float, time_limit: float, gap: float = 0.0):
        import highspy

        self.hs, self.bound, self.nodes = highspy, None, None
        with _c_stdout_to_devnull():
            h = highspy.Highs()
        for key, value in (("output_flag", False), ("threads", 1), ("mip_rel_gap", gap),
                           ("mip_abs_gap", ABS_GAP), ("time_limit", float(time_limit)),
                           ("random_seed", 0), ("mip_improving_solution_save", True),
                           ("mip_heuristic_effort", 0.01)):
            h.setOptionValue(key, value)
        self.h, self.pool, self.n = h, pool, len(pool.a)
        inf = highspy.kHighsInf
        none_i, none_f = np.array([], dtype=np.int32), np.array([])
        # rows 0..n-1: one op per layer; row n: budget; row n+1: objective >= previous optimum
        h.addRows(self.n, np.ones(self.n), np.ones(self.n), 0, np.zeros(self.n, dtype=np.int32),
                  none_i, none_f)
        h.addRow(-inf, float(budget_ms), 0, none_i, none_f)
        h.addRow(-inf, inf, 0, none_i, none_f)
        self.col: dict[tuple[int, int], int] = {}
        self.op: list[tuple[int, int]] = []

    def add_ops(self, ops: list[tuple[int, int]]) -> None:
        if not ops:
            return
        n, h = self.n, self.h
        first = h.getNumCol()
        for i, j in ops:
            a, b = float(self.pool.a[i][j]), float(self.pool.b[i][j])
            h.addCol(a, 0.0, 1.0, 3, np.array([i, n, n + 1], dtype=np.int32),
                     np.array([1.0, b, a]))
            self.col[(i, j)] = len(self.op)
            self.op.append((i, j))
        cols = np.arange(first, first + len(ops), dtype=np.int32)
        h.changeColsIntegrality(len(ops), cols,
                                np.array([self.hs.HighsVarType.kInteger] * len(ops)))

    def add_overlap(self, idx: list[int], limit: int) -> None:
        cols = np.array([self.col[(i, j)] for i, j in enumerate(idx)], dtype=np.int32)
        self.h.addRow(-self.hs.kHighsInf, float(limit), len(cols), cols, np.ones(len(cols)))

    def lower_bound(self, value: float) -> None:
        # the previous optimum, less a margin for rounding in the solver
        margin = ABS_GAP
        self.h.changeRowBounds(self.n + 1, value - margin, self.hs.kHighsInf)

    def set_time_limit(self, seconds: float) -> None:
        self.h.setOptionValue("time_limit", float(seconds))

    def start(self, idx: tuple[int, ...]) -> None:
        cols = np.array([self.col[(i, j)] for i, j in enumerate(idx)], dtype=np.int32)
        self.h.setSolution(len(cols), cols, np.ones(len(cols)))

    def _decode(self, x) -> list[int] | None:
        return _decode(self.op, x, self.n)

    def run(self) -> tuple[str, list[int] | None, list[list[int]]]:
        h, hs = self.h, self.hs
        self.bound = None
        h.run()
        self.nodes = int(h.getInfo().mip_node_count)
        found = [x for x in (self._decode(s.col_value) for s in h.getSavedMipSolutions()) if x]
        ms = h.getModelStatus()
        if h.getInfo().primal_solution_status != 2:  # no feasible point
            if ms == hs.HighsModelStatus.kInfeasible:
                return "infeasible", None, found
            if ms == hs.HighsModelStatus.kTimeLimit:
                return "time-limited", None, found
            return h.modelStatusToString(ms), None, found
        idx = self._decode(h.getSolution().col_value)
        info = h.getInfo()
        self.bound = float(info.mip_dual_bound)
        proven = abs(info.objective_function_value - info.mip_dual_bound) <= 2 * ABS_GAP
        if ms == hs.HighsModelStatus.kOptimal and proven:
            status = "optimal"
        elif ms == hs.HighsModelStatus.kTimeLimit:
            status = "time-limited"
        else:
            status = "feasible"
            _logger.info("HiGHS stopped with %s, objective %.12g, dual bound %.12g",
                         h.modelStatusToString(ms), info.objective_function_value,
                         info.mip_dual_bound)
        return status, idx, found


def _gurobi_env():
    """gurobipy and a started, silent Gurobi environment; SearchError saying what to do if not."""
    try:
        import gurobipy as gp
    except ImportError as e:
        raise SearchError(
            "solver 'gurobi' needs gurobipy: pip install 'hant-compressor[gurobi]' (its "
            "bundled license solves models up to 2000 variables); or use solver 'highs'"
        ) from e
    try:
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)  # also keeps the license banner off stdout
        env.start()
    except gp.GurobiError as e:
        raise SearchError(f"Gurobi could not start ({e}); check its license, or use "
                          "solver 'highs'") from e
    return gp, env


def check_solver(solver: str) -> None:
    """Raise SearchError now if `solve` could not use `solver`, so a run fails before any work."""
    if solver == "highs":
        return
    if solver == "gurobi":
        _gurobi_env()[1].dispose()
        return
    available = pulp.listSolvers(onlyAvailable=True)
    if solver not in available:
        raise SearchError(
            f"solver '{solver}' is not available; use 'highs', 'gurobi' (needs gurobipy) or "
            f"one of: {', '.join(available)}"
        )


class _Gurobi:
    """Eq. 4 in one in-process Gurobi model, grown like `_Highs` (optional: needs `gurobipy`).

    `pip install gurobipy` brings a size-limited license (2000 variables, 2000 rows) that is
    enough at paper scale because only admitted ops become variables (~1000 of 46 x 197 for
    K = 100 on the benchmark instance); larger models need a full Gurobi license.
    """

    _SIZE_LIMIT = 10010  # GurobiError code: model too large for a size-limited license

    def __init__(self, pool: _Pool, budget_ms: float, time_limit: float, gap: float = 0.0):
        gp, env = _gurobi_env()
        self.gp, self.bound, self.nodes = gp, None, None
        m = gp.Model(env=env)
        for key, value in (("Threads", 1), ("MIPGap", gap), ("MIPGapAbs", ABS_GAP),
                           ("TimeLimit", float(time_limit)), ("Seed", 0)):
            m.setParam(key, value)
        self.env, self.m, self.pool, self.n = env, m, pool, len(pool.a)
        zero = gp.LinExpr()
        self.one = [m.addLConstr(zero, gp.GRB.EQUAL, 1.0) for _ in range(self.n)]
        self.budget = m.addLConstr(zero, gp.GRB.LESS_EQUAL, float(budget_ms))
        self.var: dict[tuple[int, int], object] = {}

    def add_ops(self, ops: list[tuple[int, int]]) -> None:
        for i, j in ops:
            a, b = float(self.pool.a[i][j]), float(self.pool.b[i][j])
            self.var[(i, j)] = self.m.addVar(
                lb=0.0, ub=1.0, obj=a, vtype=self.gp.GRB.BINARY,
                column=self.gp.Column([1.0, b], [self.one[i], self.budget]))

    def add_overlap(self, idx: list[int], limit: int) -> None:
        terms = self.gp.quicksum(self.var[(i, j)] for i, j in enumerate(idx))
        self.m.addLConstr(terms, self.gp.GRB.LESS_EQUAL, float(limit))

    def lower_bound(self, value: float) -> None:
        # not a row here: with the previous optimum as one, Gurobi took 3.4x longer for K = 20
        # (BENCHMARKS.md); its dual bound is valid without it
        pass

    def set_time_limit(self, seconds: float) -> None:
        self.m.setParam("TimeLimit", float(seconds))

    def start(self, idx: tuple[int, ...]) -> None:
        self.m.update()
        chosen = {(i, j) for i, j in enumerate(idx)}
        for key, v in self.var.items():
            v.Start = 1.0 if key in chosen else 0.0

    def _decode(self, values: list[float]) -> list[int] | None:
        return _decode(list(self.var), values, self.n)

    def run(self) -> tuple[str, list[int] | None, list[list[int]]]:
        m, grb, gv = self.m, self.gp.GRB, list(self.var.values())
        self.bound = None
        try:
            m.optimize()
        except self.gp.GurobiError as e:
            if e.errno == self._SIZE_LIMIT:
                raise SearchError(
                    f"the model ({len(gv)} ops, {m.NumConstrs} rows) is too large for Gurobi's "
                    "size-limited license; use solver 'highs' or a full Gurobi license") from e
            raise SearchError(f"Gurobi failed: {e}") from e
        self.nodes = int(m.NodeCount)
        found = []
        for s in range(m.SolCount):
            m.setParam("SolutionNumber", s)
            x = self._decode(m.getAttr("Xn", gv))
            if x:
                found.append(x)
        if m.SolCount == 0:
            if m.Status in (grb.INFEASIBLE, grb.INF_OR_UNBD):  # binary: never unbounded
                return "infeasible", None, found
            if m.Status == grb.TIME_LIMIT:
                return "time-limited", None, found
            return f"Gurobi status {m.Status}", None, found
        idx = self._decode(m.getAttr("X", gv))
        self.bound = float(m.ObjBound)
        if m.Status == grb.OPTIMAL and abs(m.ObjVal - m.ObjBound) <= 2 * ABS_GAP:
            status = "optimal"
        elif m.Status == grb.TIME_LIMIT:
            status = "time-limited"
        else:
            status = "feasible"
            _logger.info("Gurobi stopped with status %d, objective %.12g, dual bound %.12g",
                         m.Status, m.ObjVal, m.ObjBound)
        return status, idx, found


class _Pulp:
    """Eq. 4 as one PuLP model: every op is a variable, ops not admitted get an upper bound 0."""

    def __init__(self, pool: _Pool, budget_ms: float, solver: str, time_limit: float,
                 gap: float = 0.0):
        check_solver(solver)
        kw = {"msg": False, "timeLimit": time_limit, "gapRel": gap, "gapAbs": ABS_GAP}
        if solver in ("PULP_CBC_CMD", "HiGHS", "HiGHS_CMD"):
            kw["threads"] = 1
        if solver in ("PULP_CBC_CMD", "COIN_CMD"):
            # CBC prunes nodes that cannot improve by its cutoff increment (about 1e-4 by
            # default) and then reports a worse solution as optimal: losses differ by less
            kw["options"] = ["increment 1e-10"]
        self.solver = pulp.getSolver(solver, **kw)
        self.time_limit, self.pool, self.n, self.gap = time_limit, pool, len(pool.a), gap
        prob = pulp.LpProblem("hant", pulp.LpMinimize)
        z = {(i, j): pulp.LpVariable(f"z_{i}_{j}", 0, 0, cat="Binary")
             for i, names in enumerate(pool.names) for j in range(len(names))}
        prob += pulp.lpSum(float(pool.a[i][j]) * v for (i, j), v in z.items())
        prob += pulp.lpSum(float(pool.b[i][j]) * v for (i, j), v in z.items()) <= budget_ms, \
            "budget"
        for i, names in enumerate(pool.names):
            prob += pulp.lpSum(z[(i, j)] for j in range(len(names))) == 1, f"one_{i}"
        self.prob, self.z, self.rows = prob, z, 0
        self.bound = None  # PuLP reports no dual bound: only an optimum counts as proven
        self.nodes = None  # nor its node count

    def add_ops(self, ops: list[tuple[int, int]]) -> None:
        for key in ops:
            self.z[key].upBound = 1

    def add_overlap(self, idx: list[int], limit: int) -> None:
        self.prob += pulp.lpSum(self.z[(i, j)] for i, j in enumerate(idx)) <= limit, \
            f"overlap_{self.rows}"
        self.rows += 1

    def lower_bound(self, value: float) -> None:
        pass  # an objective-parallel row only slows CBC down

    def set_time_limit(self, seconds: float) -> None:
        self.solver.timeLimit = self.time_limit = seconds

    def start(self, idx: tuple[int, ...]) -> None:
        pass  # a MIP start would go through a file; not worth it

    def run(self) -> tuple[str, list[int] | None, list[list[int]]]:
        t0 = time.perf_counter()
        try:
            status = self.prob.solve(self.solver)
        except pulp.PulpSolverError as exc:
            raise SearchError(f"the solver failed: {exc}") from exc
        elapsed = time.perf_counter() - t0
        if self.prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            if status == pulp.LpStatusInfeasible:
                return "infeasible", None, []
            return pulp.LpStatus[status], None, []
        idx = _decode(list(self.z), [v.value() or 0 for v in self.z.values()], self.n)
        if elapsed >= self.time_limit * 0.99:
            return "time-limited", idx, []
        optimal = self.prob.sol_status == pulp.LpSolutionOptimal and self.gap == 0
        return ("optimal" if optimal else "feasible"), idx, []
