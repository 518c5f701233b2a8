"""Phase 2 (HANT Eq. 4): K diverse solutions of the integer program, then candidate evaluation.

    min_z  sum_i a_i^T z_i
    s.t.   sum_i b_i^T z_i <= B - stem - head,   1^T z_i = 1 for all i,
           sum_i z_i^T z_i^(k') <= O  for every earlier solution k'

The PuLP model is built once; each new solution adds one overlap constraint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import pulp

from ._errors import InfeasibleError, SearchError

__all__ = ["Solution", "solve", "min_latency"]

_logger = logging.getLogger(__name__)


@dataclass
class Solution:
    choices: list[str]
    objective: float  # sum of a_ij over the chosen ops (predicted loss change)
    latency_ms: float  # LUT sum over layers (stem and head excluded)
    status: str  # optimal | feasible | time-limited

    def to_dict(self) -> dict:
        return {"choices": self.choices, "objective": self.objective,
                "latency_ms": self.latency_ms, "status": self.status}


def min_latency(b: list[dict[str, float]]) -> float:
    """Latency of the fastest op in every layer (the least any architecture can cost)."""
    return sum(min(layer.values()) for layer in b)


def _solver(name: str, time_limit: float):
    if name not in pulp.listSolvers(onlyAvailable=True):
        raise SearchError(
            f"solver '{name}' is not available; available: "
            f"{', '.join(pulp.listSolvers(onlyAvailable=True))}"
        )
    return pulp.getSolver(name, msg=False, timeLimit=time_limit)


def solve(
    a: list[dict[str, float]],
    b: list[dict[str, float]],
    budget_ms: float,
    k: int = 20,
    overlap: float = 0.7,
    solver: str = "PULP_CBC_CMD",
    time_limit: float = 20.0,
) -> list[Solution]:
    """Up to `k` solutions, each overlapping every earlier one in at most floor(overlap*N) layers.

    Args:
        a: per layer, op name -> fitness (loss change; lower is better).
        b: per layer, op name -> latency in ms (same keys as `a`).
        budget_ms: latency budget for the layers (stem and head already subtracted).
    """
    n = len(a)
    floor_ms = min_latency(b)
    if budget_ms < floor_ms - 1e-9:
        raise InfeasibleError(
            f"the layers' latency budget {budget_ms:.3f} ms is below the fastest reachable "
            f"{floor_ms:.3f} ms"
        )
    prob = pulp.LpProblem("hant", pulp.LpMinimize)
    z = {
        (i, op): pulp.LpVariable(f"z_{i}_{j}", cat="Binary")
        for i in range(n)
        for j, op in enumerate(sorted(a[i]))
    }
    prob += pulp.lpSum(a[i][op] * v for (i, op), v in z.items())
    prob += pulp.lpSum(b[i][op] * v for (i, op), v in z.items()) <= budget_ms, "budget"
    for i in range(n):
        prob += pulp.lpSum(v for (li, _), v in z.items() if li == i) == 1, f"one_{i}"
    limit = math.floor(overlap * n)
    sol_solver = _solver(solver, time_limit)
    out: list[Solution] = []
    for s in range(k):
        t0 = time.perf_counter()
        status = prob.solve(sol_solver)
        elapsed = time.perf_counter() - t0
        found = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        if not found:
            if s == 0:
                raise SearchError(f"the integer program is {pulp.LpStatus[status]}")
            _logger.info("stopped after %d solutions: %s", s, pulp.LpStatus[status])
            break
        choices = []
        for i in range(n):
            chosen = [op for (li, op), v in z.items() if li == i and (v.value() or 0) > 0.5]
            choices.append(chosen[0])
        if elapsed >= time_limit * 0.99:
            sol_status = "time-limited"
        elif prob.sol_status == pulp.LpSolutionOptimal:
            sol_status = "optimal"
        else:
            sol_status = "feasible"
        out.append(
            Solution(
                choices,
                float(sum(a[i][c] for i, c in enumerate(choices))),
                float(sum(b[i][c] for i, c in enumerate(choices))),
                sol_status,
            )
        )
        prob += pulp.lpSum(z[(i, c)] for i, c in enumerate(choices)) <= limit, f"overlap_{s}"
    return out
