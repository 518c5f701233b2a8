"""A simple baseline to measure HANT against: drop whole blocks.

Layers whose input and output shapes match can be skipped (the ``identity`` op). The baseline
drops them greedily, the cheapest first by accuracy lost per millisecond saved (the fitness
table's accuracy drop, ties broken by its loss change), until the LUT predicts the budget; the
result is then finetuned like any student. It needs no search and no new ops, so it shows what
the rest of HANT adds at the same latency.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fitness import Fitness
from .latency import Latencies
from .search import Solution
from .split import TEACHER

__all__ = ["BlockDrop", "drop_blocks"]

IDENTITY = "identity"


@dataclass
class BlockDrop:
    choices: list[str]  # "teacher" or "identity" per layer
    predicted_ms: float  # LUT: stem, head and the layers kept
    reached: bool  # whether the budget was met (dropping every droppable block may not)
    order: list[int]  # the layers dropped, in the greedy order (the last is the first to undo)

    def solution(self, lat: Latencies, fit: Fitness) -> Solution:
        """As a search solution: the fitness objective and the layers' LUT latency (stem and
        head excluded, as the solver counts it)."""
        objective = sum(fit.a[i].get(op, 0.0) for i, op in enumerate(self.choices))
        return Solution(self.choices, objective, self.predicted_ms - lat.fixed_ms, "block-drop")

    def undo_last(self, lat: Latencies) -> BlockDrop:
        """The same drops less the last one: a step back where the LUT's prediction overshot
        and a measurement says the network is faster than it had to be."""
        if not self.order:
            raise ValueError("no block was dropped, so there is none to undo")
        i = self.order[-1]
        choices = list(self.choices)
        choices[i] = TEACHER
        ms = self.predicted_ms + lat.b[i][TEACHER] - lat.b[i][IDENTITY]
        # `reached` stays: it says whether greedy dropping could meet the budget at all; the
        # step back is judged by a measurement, so `predicted_ms` may now exceed that budget
        return BlockDrop(choices, ms, self.reached, self.order[:-1])


def drop_blocks(lat: Latencies, fit: Fitness, budget_ms: float) -> BlockDrop:
    """Teacher layers replaced by ``identity``, greedily by accuracy drop per ms saved, until
    the predicted latency is within `budget_ms` (the whole network's ms, stem and head
    included, as ``lat.teacher_ms``)."""
    n = len(lat.b)
    choices = [TEACHER] * n
    total = lat.fixed_ms + sum(lat.b[i][TEACHER] for i in range(n))

    def cost(i: int) -> tuple[float, float]:
        saved = max(lat.b[i][TEACHER] - lat.b[i][IDENTITY], 1e-9)
        return fit.acc_drop[i][IDENTITY] / saved, fit.a[i][IDENTITY] / saved

    droppable = [i for i in range(n) if IDENTITY in lat.b[i] and IDENTITY in fit.a[i]
                 and lat.b[i][IDENTITY] < lat.b[i][TEACHER]]
    order: list[int] = []
    for i in sorted(droppable, key=cost):
        if total <= budget_ms:
            break
        choices[i] = IDENTITY
        order.append(i)
        total -= lat.b[i][TEACHER] - lat.b[i][IDENTITY]
    return BlockDrop(choices, total, total <= budget_ms, order)
