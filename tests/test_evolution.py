
import pytest

from compressor import InfeasibleError
from compressor.evolution import nsga2
from compressor.search import min_latency, solve

from .conftest import random_instance


def _dominates(p, q):
    return (p.objective <= q.objective and p.latency_ms <= q.latency_ms
            and (p.objective, p.latency_ms) != (q.objective, q.latency_ms))


def test_nsga2_returns_feasible_non_dominated_solutions_sorted():
    a, b = random_instance(8, 5)
    budget = 0.6 * len(a)
    front = nsga2(a, b, budget, pop_size=24, generations=30, seed=1)
    assert front
    for s in front:
        assert s.status == "feasible"
        assert s.latency_ms <= budget + 1e-9
        assert s.latency_ms == pytest.approx(sum(b[i][c] for i, c in enumerate(s.choices)))
        assert s.objective == pytest.approx(sum(a[i][c] for i, c in enumerate(s.choices)))
        assert not any(_dominates(o, s) for o in front)
    objs = [s.objective for s in front]
    assert objs == sorted(objs)
    # never better than the proven optimum
    assert front[0].objective >= solve(a, b, budget, k=1, solver="highs")[0].objective - 1e-9


def test_nsga2_is_deterministic_for_a_seed():
    a, b = random_instance(8, 5, seed=2)
    x = nsga2(a, b, 0.6 * len(a), pop_size=16, generations=10, seed=3)
    y = nsga2(a, b, 0.6 * len(a), pop_size=16, generations=10, seed=3)
    assert [s.choices for s in x] == [s.choices for s in y]


def test_nsga2_hardware_in_the_loop_and_time_limit():
    a, b = random_instance(6, 4, seed=4)
    calls = []

    def measure(choices):
        calls.append(tuple(choices))
        return 1.1 * sum(b[i][c] for i, c in enumerate(choices))

    budget = 0.7 * len(a)
    front = nsga2(a, b, budget, pop_size=12, generations=1000, time_limit=0.5, latency_fn=measure)
    assert front and calls
    assert len(set(calls)) == len(calls)  # cached per architecture
    for s in front:
        assert s.latency_ms == pytest.approx(1.1 * sum(b[i][c] for i, c in enumerate(s.choices)))
        assert s.latency_ms <= budget + 1e-9


def test_nsga2_infeasible_budget():
    a, b = random_instance(8, 5)
    with pytest.raises(InfeasibleError, match="below the fastest reachable"):
        nsga2(a, b, min_latency(b) * 0.5)
