import itertools
import math
import random
import sys

import pytest

from compressor import InfeasibleError
from compressor.search import min_latency, solve

from .conftest import random_instance as _instance


def test_first_solution_is_the_true_optimum():
    a, b = _instance()
    budget = 0.6 * len(a)
    sol = solve(a, b, budget, k=1)[0]
    best = min(
        (sum(a[i][c] for i, c in enumerate(ch)), ch)
        for ch in itertools.product(*[sorted(x) for x in a])
        if sum(b[i][c] for i, c in enumerate(ch)) <= budget
    )
    assert sol.objective == pytest.approx(best[0])
    assert sol.status == "optimal"
    assert sol.latency_ms <= budget + 1e-9


def test_k_solutions_are_diverse_and_within_budget():
    a, b = _instance(n=10, m=5, seed=1)
    budget = 0.6 * len(a)
    sols = solve(a, b, budget, k=8, overlap=0.7)
    assert len(sols) == 8
    limit = int(0.7 * len(a))
    for k, s in enumerate(sols):
        assert s.latency_ms <= budget + 1e-9
        for prev in sols[:k]:
            overlap = sum(x == y for x, y in zip(s.choices, prev.choices))
            assert overlap <= limit
    objs = [s.objective for s in sols]
    assert objs == sorted(objs)  # each new constraint can only make the optimum worse


def test_infeasible_budget():
    a, b = _instance()
    with pytest.raises(InfeasibleError, match="below the fastest reachable"):
        solve(a, b, min_latency(b) * 0.5, k=1)


# --- solvers, statuses, pool exactness, messages ---------------------------------------------

def _gurobi_usable() -> bool:
    from compressor import SearchError
    from compressor.search import check_solver

    try:
        check_solver("gurobi")
        return True
    except SearchError:  # not installed, or no usable license: the gurobi tests are skipped
        return False


needs_gurobi = pytest.mark.skipif(not _gurobi_usable(),
                                  reason="gurobipy is not installed or has no usable license")
SOLVER_NAMES = ["highs", "PULP_CBC_CMD", pytest.param("gurobi", marks=needs_gurobi)]


def _brute(a, b, budget, earlier=(), limit=None):
    """Optimum of Eq. 4 by enumeration, with overlap rows for the `earlier` choices."""
    best = None
    for ch in itertools.product(*[sorted(x) for x in a]):
        if sum(b[i][c] for i, c in enumerate(ch)) > budget:
            continue
        if any(sum(x == y for x, y in zip(ch, e)) > limit for e in earlier):
            continue
        val = sum(a[i][c] for i, c in enumerate(ch))
        if best is None or val < best:
            best = val
    return best


def _dominated_instance(n=5, m=5, seed=3):
    """Small layers in which several ops are dominated (to exercise the pool)."""
    rng = random.Random(seed)
    a, b = [], []
    for _ in range(n):
        la, lb = {"teacher": 0.0}, {"teacher": 1.0}
        for j in range(m):
            la[f"op{j}"] = round(rng.uniform(0.0, 1.0), 1)  # coarse values: ties and dominance
            lb[f"op{j}"] = round(rng.uniform(0.1, 0.9), 1)
        a.append(la)
        b.append(lb)
    return a, b


@pytest.mark.parametrize("scale", [1.0, 1e-5])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_every_solution_matches_brute_force(solver, scale):
    """Each solution k is the optimum of Eq. 4 with the overlap rows of solutions 1..k-1, even
    though dominated ops are left out of the model at first, and even when losses differ by far
    less than a solver's default tolerances (CBC's cutoff increment)."""
    a, b = _dominated_instance()
    a = [{op: v * scale for op, v in layer.items()} for layer in a]
    n = len(a)
    budget = 0.55 * n
    limit = int(0.6 * n)
    sols = solve(a, b, budget, k=6, overlap=0.6, solver=solver)
    assert len(sols) == 6
    for k, s in enumerate(sols):
        assert s.status == "optimal"
        want = _brute(a, b, budget, [x.choices for x in sols[:k]], limit)
        assert s.objective == pytest.approx(want, rel=1e-9, abs=1e-15)
        assert s.latency_ms <= budget + 1e-9


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_first_solution_optimal_for_each_solver(solver):
    a, b = _instance(n=7, m=4, seed=5)
    budget = 0.5 * len(a)
    sol = solve(a, b, budget, k=1, solver=solver)[0]
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(_brute(a, b, budget), abs=1e-9)
    assert sol.to_dict()["status"] == "optimal"


def test_pulp_highs_interface_too():
    import pulp

    if "HiGHS" not in pulp.listSolvers(onlyAvailable=True):
        pytest.skip("PuLP's HiGHS interface is not available")
    a, b = _instance(n=6, m=3, seed=2)
    budget = 0.6 * len(a)
    sols = solve(a, b, budget, k=3, solver="HiGHS")
    ref = solve(a, b, budget, k=3, solver="highs")
    assert [s.objective for s in sols] == pytest.approx([s.objective for s in ref], abs=1e-9)


def test_overlap_rows_respected_with_highs():
    a, b = _instance(n=12, m=5, seed=4)
    budget = 0.6 * len(a)
    sols = solve(a, b, budget, k=10, overlap=0.5, solver="highs")
    limit = int(0.5 * len(a))
    assert len(sols) == 10
    for k, s in enumerate(sols):
        assert s.status == "optimal"
        for prev in sols[:k]:
            assert sum(x == y for x, y in zip(s.choices, prev.choices)) <= limit
    objs = [s.objective for s in sols]
    assert objs == sorted(objs)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_stops_when_no_more_diverse_solutions(solver):
    # two layers, two ops each, overlap 0: the solutions must differ everywhere -> only 2 exist
    a = [{"x": 0.0, "y": 1.0}, {"x": 0.0, "y": 1.0}]
    b = [{"x": 1.0, "y": 0.5}, {"x": 1.0, "y": 0.5}]
    sols = solve(a, b, 2.0, k=5, overlap=0.01, solver=solver)
    assert len(sols) == 2
    assert sols[0].choices == ["x", "x"] and sols[1].choices == ["y", "y"]


def test_time_limited_status_is_recorded(monkeypatch):
    from compressor import search

    def fake_run(self):
        status, idx, found = real_run(self)
        return "time-limited", idx, found

    real_run = search._Highs.run
    monkeypatch.setattr(search._Highs, "run", fake_run)
    a, b = _instance()
    sols = solve(a, b, 0.6 * len(a), k=2, solver="highs")
    assert [s.status for s in sols] == ["time-limited", "time-limited"]


def test_infeasible_message_names_the_fastest_speedup():
    a, b = _instance()
    teacher = sum(x["teacher"] for x in b) + 0.5
    with pytest.raises(InfeasibleError, match=r"fastest reachable speedup is 0\.\d{4}"):
        solve(a, b, min_latency(b) * 0.5, k=1, solver="highs", teacher_ms=teacher, fixed_ms=0.5)
    from compressor.search import fastest_speedup

    assert fastest_speedup(b, teacher, 0.5) == pytest.approx((min_latency(b) + 0.5) / teacher)


def test_unknown_solver_says_what_is_available():
    from compressor import SearchError

    a, b = _instance()
    with pytest.raises(SearchError, match="not available; use 'highs'"):
        solve(a, b, 0.6 * len(a), k=1, solver="NO_SUCH_SOLVER")


def test_gurobi_without_gurobipy_says_how_to_install_it(monkeypatch):
    from compressor import SearchError

    monkeypatch.setitem(sys.modules, "gurobipy", None)  # import fails as if not installed
    a, b = _instance()
    with pytest.raises(SearchError, match=r"needs gurobipy: pip install '\S+\[gurobi\]'"):
        solve(a, b, 0.6 * len(a), k=1, solver="gurobi")


@needs_gurobi
def test_gurobi_size_limited_license_says_what_to_do(monkeypatch):
    """The pip license stops at 2000 variables; the message must name the way out."""
    import gurobipy as gp

    from compressor import SearchError

    def too_large(self, *args):
        raise gp.GurobiError(10010, "Model too large for size-limited license")

    monkeypatch.setattr(gp.Model, "optimize", too_large)
    a, b = _instance()
    with pytest.raises(SearchError, match="too large for Gurobi's size-limited license; use "
                                          "solver 'highs'"):
        solve(a, b, 0.6 * len(a), k=1, solver="gurobi")


@needs_gurobi
def test_gurobi_without_a_license_says_what_to_do(monkeypatch):
    import gurobipy as gp

    from compressor import SearchError
    from compressor.search import check_solver

    def no_license(self):
        raise gp.GurobiError(10009, "No Gurobi license found")

    monkeypatch.setattr(gp.Env, "start", no_license)
    with pytest.raises(SearchError, match="Gurobi could not start .*No Gurobi license found.*"
                                          "check its license, or use solver 'highs'"):
        check_solver("gurobi")


def test_pool_keeps_dominated_ops_until_their_dominators_are_used():
    from compressor.search import _Pool

    a = [{"t": 0.0, "good": 0.1, "bad": 0.2, "twin": 0.1}]
    b = [{"t": 1.0, "good": 0.5, "bad": 0.6, "twin": 0.5}]
    pool = _Pool(a, b, 10.0)
    first = {pool.names[0][j] for _, j in pool.admit()}
    assert first == {"t", "good"}  # "bad" dominated by good, "twin" ties with good (later name)
    pool.use([pool.names[0].index("good")])
    assert {pool.names[0][j] for _, j in pool.admit()} == {"twin"}  # good used: its twin joins
    pool.use([pool.names[0].index("twin")])
    assert {pool.names[0][j] for _, j in pool.admit()} == {"bad"}


def test_kendall_tau():
    from compressor.search import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])


def test_total_time_limit_stops_the_loop():
    a, b = _instance(n=8, m=4, seed=6)
    sols = solve(a, b, 0.6 * len(a), k=5, solver="highs", total_time_limit=0.0)
    assert len(sols) == 1 and sols[0].status == "optimal"


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_a_gap_marks_unproven_solutions_feasible(solver):
    a, b = _instance(n=10, m=5, seed=7)
    budget = 0.5 * len(a)
    exact = solve(a, b, budget, k=1, solver=solver)[0]
    sol = solve(a, b, budget, k=1, solver=solver, gap=0.5)[0]
    assert sol.status in ("optimal", "feasible")
    assert sol.objective <= exact.objective * 2 + 1e-9
    if sol.objective > exact.objective + 1e-9:
        assert sol.status == "feasible"


def test_every_solution_records_a_proven_bound_and_gap():
    """Optimal: bound = objective, gap 0. Stopped early by a gap: HiGHS's dual bound, which must
    not exceed the true optimum of that k (checked against the exact solve)."""
    from .instances import make_instance

    a, b = make_instance(layers=12, ops=30, seed=3)
    budget = 0.5 * sum(x["teacher"] for x in b)
    exact = solve(a, b, budget, k=3, solver="highs")
    for s in exact:
        assert s.status == "optimal" and s.bound == s.objective and s.gap == 0.0
        assert s.to_dict()["gap"] == 0.0
    loose = solve(a, b, budget, k=1, solver="highs", gap=0.05)[0]
    assert loose.bound is not None
    assert loose.bound <= exact[0].objective + 1e-12 <= loose.objective + 2e-12
    assert loose.gap == pytest.approx((loose.objective - loose.bound) / loose.objective)
    # a PuLP solver reports no bound for what it did not prove
    cbc = solve(a, b, budget, k=1, solver="PULP_CBC_CMD", gap=0.05)[0]
    if cbc.status == "optimal":
        assert cbc.gap == 0.0
    else:
        assert cbc.bound is None


@pytest.mark.parametrize("solver", ["highs", pytest.param("gurobi", marks=needs_gurobi)])
def test_optima_match_an_independent_exact_dp_beyond_brute_force(solver):
    """12 layers x 12 ops (12^12 choices: too many to enumerate): each of 7 optima, given the
    same earlier solutions, equals the optimum of the counter dynamic program, an exact method
    that shares no code with the search (tests/counter_dp.py). Also, the solver
    reports the nodes each proof took and the DP's Lagrangian bound never exceeds the optimum."""
    from .counter_dp import counter_dp
    from .instances import as_arrays, make_instance

    a_d, b_d = make_instance(layers=12, ops=12, seed=1)
    budget = 0.5 * sum(x["teacher"] for x in b_d)
    names, a, b = as_arrays(a_d, b_d)
    sols = solve(a_d, b_d, budget, k=7, overlap=0.7, solver=solver)
    assert len(sols) == 7 and all(s.status == "optimal" for s in sols)
    assert all(isinstance(s.nodes, int) and s.nodes >= 0 for s in sols)
    idx = [[names[i].index(c) for i, c in enumerate(s.choices)] for s in sols]
    for k, sol in enumerate(sols):
        dp = counter_dp(a, b, budget, idx[:k], limit=8)
        assert dp["objective"] == pytest.approx(sol.objective, rel=1e-12, abs=1e-15)
        assert dp["lagrangian_bound"] <= sol.objective + 1e-12
        chosen = dp["choice"]
        assert sum(b[i][j] for i, j in enumerate(chosen)) <= budget + 1e-9
        assert all(sum(x == y for x, y in zip(chosen, r)) <= 8 for r in idx[:k])
    # the DP itself: told of the first six, it finds nothing below the seventh optimum
    assert counter_dp(a, b, budget, idx[:6], 8, upper=sols[6].objective * (1 - 1e-6))[
        "objective"] is None


def test_highs_prints_no_banner():
    """HiGHS writes its banner from C when a model is created; a --quiet run must not show it
    (a fresh process: the banner comes once per process)."""
    import subprocess
    import sys

    code = ("from compressor.search import solve\n"
            "a = [{'teacher': 0.0, 'x': 1.0}] * 3\n"
            "b = [{'teacher': 1.0, 'x': 0.5}] * 3\n"
            "print(len(solve(a, b, 2.5, k=1, solver='highs')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1" and "HiGHS" not in out.stdout + out.stderr
