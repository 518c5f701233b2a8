import itertools
import random

import pytest

from compressor import InfeasibleError
from compressor.search import min_latency, solve


def _instance(n=6, m=4, seed=0):
    rng = random.Random(seed)
    a, b = [], []
    for _ in range(n):
        a.append({"teacher": 0.0, **{f"op{j}": rng.uniform(0.01, 1) for j in range(m)}})
        b.append({"teacher": 1.0, **{f"op{j}": rng.uniform(0.05, 0.9) for j in range(m)}})
    return a, b


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
