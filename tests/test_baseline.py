"""The block-dropping baseline: the cheapest blocks per millisecond go first, and it stops as
soon as the budget is met (or says it could not be)."""

import pytest

from compressor.baseline import drop_blocks
from compressor.fitness import Fitness
from compressor.latency import Latencies


def _tables():
    # layer 0 cannot be dropped (no identity: shapes differ); layer 1 costs 4 points for 2 ms
    # (2/ms); layer 2 costs 1 point for 1 ms (1/ms); layer 3 costs 0.5 points for 1 ms but
    # loses more loss (tie-break irrelevant: 0.5/ms is cheapest)
    b = [{"teacher": 3.0, "cb": 1.0}, {"teacher": 2.0, "identity": 0.0},
         {"teacher": 1.0, "identity": 0.0}, {"teacher": 1.0, "identity": 0.0}]
    fit = Fitness(1.0, 80.0, 10, a=[{"teacher": 0.0, "cb": 0.1}, {"teacher": 0.0, "identity": 0.4},
                                    {"teacher": 0.0, "identity": 0.1},
                                    {"teacher": 0.0, "identity": 0.3}],
                  acc_drop=[{"teacher": 0.0, "cb": 1.0}, {"teacher": 0.0, "identity": 4.0},
                            {"teacher": 0.0, "identity": 1.0},
                            {"teacher": 0.0, "identity": 0.5}])
    return Latencies(b, stem_ms=0.5, head_ms=0.5), fit


def test_drops_the_cheapest_blocks_per_millisecond_until_the_budget():
    lat, fit = _tables()  # teacher: 1 + 7 = 8 ms
    one = drop_blocks(lat, fit, 7.0)
    assert one.choices == ["teacher", "teacher", "teacher", "identity"]
    assert one.predicted_ms == 7.0 and one.reached
    two = drop_blocks(lat, fit, 6.0)
    assert two.choices == ["teacher", "teacher", "identity", "identity"]
    three = drop_blocks(lat, fit, 4.5)
    assert three.choices == ["teacher", "identity", "identity", "identity"]
    assert three.predicted_ms == 4.0 and three.reached
    assert three.order == [3, 2, 1]


def test_undoing_the_last_drop_gives_the_previous_step():
    """Where a measurement says the LUT overshot, the front script steps back one drop."""
    lat, fit = _tables()
    back = drop_blocks(lat, fit, 4.5).undo_last(lat)
    two = drop_blocks(lat, fit, 6.0)
    assert back.choices == two.choices and back.order == two.order == [3, 2]
    assert back.predicted_ms == two.predicted_ms == 6.0
    with pytest.raises(ValueError, match="none to undo"):
        drop_blocks(lat, fit, 100.0).undo_last(lat)


def test_says_when_dropping_every_block_is_not_enough():
    lat, fit = _tables()
    out = drop_blocks(lat, fit, 3.0)
    assert out.choices == ["teacher", "identity", "identity", "identity"]
    assert not out.reached and out.predicted_ms == 4.0
    assert drop_blocks(lat, fit, 100.0).choices == ["teacher"] * 4


def test_the_search_ranks_the_block_dropping_architecture_too():
    """`search.block_drop_candidate`: the baseline's architecture at the budget joins the
    solver's solutions to be ranked, once, and only where it reaches the budget."""
    from compressor.recipe import SearchCfg
    from compressor.search import Solution
    from compressor.selection import _Ranker

    lat, fit = _tables()
    rank = _Ranker(None, lat, SearchCfg(), None, None, None, 0, fit=fit)
    budget = 6.0 - lat.fixed_ms  # the layers' share of a 6 ms network
    solver = [Solution(["cb", "teacher", "identity", "teacher"], 0.2, 4.0, "optimal")]
    (drop,) = rank._block_drop(solver, budget)
    assert drop.choices == ["teacher", "teacher", "identity", "identity"]
    assert drop.latency_ms == 5.0 and drop.objective == 0.4 and drop.status == "block-drop"
    assert rank._block_drop([*solver, drop], budget) == []  # already ranked
    assert rank._block_drop(solver, 3.0 - lat.fixed_ms) == []  # dropping cannot reach 3 ms
    off = _Ranker(None, lat, SearchCfg(block_drop_candidate=False), None, None, None, 0, fit=fit)
    assert off._block_drop(solver, budget) == []
