"""Timing loop: warm-up, then batches of runs until the median is stable."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Measurement", "PairedMeasurement", "measure_paired", "measure_stable"]


@dataclass
class Measurement:
    """Latency of one call in milliseconds.

    Attributes:
        ms: median of the timed runs (or the estimate).
        spread_ms: p90 - p10 of the timed runs (0 for an estimate).
        runs: number of timed runs (0 for an estimate).
        stable: the median changed by less than the tolerance between the last two batches.
        estimated: a roofline estimate, not a measurement.
    """

    ms: float
    spread_ms: float
    runs: int
    stable: bool = True
    estimated: bool = False


_CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _quantile(sorted_samples: list[float], q: float) -> float:
    return sorted_samples[int(round(q * (len(sorted_samples) - 1)))]


def measure_stable(
    fn: Callable[[], object],
    *,
    warmup_runs: int = 5,
    warmup_seconds: float = 0.05,
    batch_runs: int = 10,
    batch_seconds: float = 0.02,
    rel_tol: float = 0.02,
    min_runs: int = 20,
    min_seconds: float = 0.1,
    max_runs: int = 100_000,
    max_seconds: float = 3.0,
    clock: str = "wall",
) -> Measurement:
    """Time `fn` until the median of all samples moves by < `rel_tol` between batches.

    After warm-up (`warmup_runs` and `warmup_seconds`), runs come in batches of at least
    `batch_runs` runs and `batch_seconds`; it stops once the median moved by less than `rel_tol`
    since the previous batch (with at least `min_runs` runs over `min_seconds`), or at
    `max_runs` / `max_seconds` (then ``stable`` is False).

    `clock` ``"wall"`` times with ``time.perf_counter``; ``"thread"`` with the calling thread's
    CPU time (``time.thread_time``), which other processes preempting it do not inflate: on a
    quiet machine the two agree for single-threaded compute that runs on the calling thread
    (onnxruntime and torch with 1 intra-op thread), on a shared one only the thread clock
    stays put.

    `fn` runs the thing once; if it returns a float, that is its own elapsed time in ms (CUDA
    events), otherwise the wall time around the call is used.

    Example:
        >>> m = measure_stable(lambda: sum(range(1000)))
        >>> m.ms > 0 and m.runs >= 20
        True
    """
    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(_CLOCKS)}, got '{clock}'")
    now = _CLOCKS[clock]
    t_start = time.perf_counter()
    t_end = t_start + warmup_seconds
    n = 0
    timed = 0.0  # seconds, as the calls report them
    while n < warmup_runs or time.perf_counter() < t_end:
        r = fn()
        timed += r / 1000.0 if isinstance(r, float) else 0.0
        n += 1
    per_call = max(time.perf_counter() - t_start, timed) / n
    # a batch lasts at least `batch_seconds`: medians of microsecond ops need thousands of runs
    batch_runs = max(batch_runs, int(batch_seconds / max(per_call, 1e-9)))
    samples: list[float] = []
    prev: float | None = None
    stable = False
    start = time.perf_counter()
    while True:
        for _ in range(batch_runs):
            t0 = now()
            r = fn()
            wall = (now() - t0) * 1000.0
            samples.append(r if isinstance(r, float) else wall)
        med = statistics.median(samples)
        elapsed = max(time.perf_counter() - start, sum(samples) / 1000.0)
        if (prev is not None and abs(med - prev) <= rel_tol * prev and len(samples) >= min_runs
                and elapsed >= min_seconds):
            stable = True
            break
        if len(samples) >= max_runs or elapsed >= max_seconds:
            break
        prev = med
    s = sorted(samples)
    return Measurement(med, _quantile(s, 0.9) - _quantile(s, 0.1), len(samples), stable)


@dataclass
class PairedMeasurement:
    """Two functions timed in alternation (`measure_paired`).

    Attributes:
        a_ms, b_ms: the median over rounds of each one's `Measurement.ms`.
        ratio: b / a: each round times the pair back to back, in the other order than the
            round before; the median over consecutive rounds of their ratios' geometric mean.
        ratio_spread: max - min of the rounds' ratios.
        rounds: how many rounds.
    """

    a_ms: float
    b_ms: float
    ratio: float
    ratio_spread: float
    rounds: int


def measure_paired(a: Callable[[], Measurement], b: Callable[[], Measurement],
                   rounds: int = 5) -> PairedMeasurement:
    """Time `a` and `b` (each returns a `Measurement`, e.g. `Backend.timer`) in alternation,
    ``rounds`` times, and return the medians and the ratio b / a (`PairedMeasurement`).

    A machine's speed can drift by tens of percent over seconds to minutes (another tenant on
    the host, frequency; BENCHMARKS.md, "Latency on a drifting machine"): two networks timed
    minutes apart then differ by that drift, while pairs timed back to back see the same
    machine, so the ratio of a pair holds where the absolute figures do not.

    Example:
        >>> f = lambda: measure_stable(lambda: sum(range(2000)))
        >>> g = lambda: measure_stable(lambda: sum(range(4000)))
        >>> 1.2 < measure_paired(f, g, rounds=3).ratio < 4
        True
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    ma, mb = [], []
    for i in range(rounds):  # a b, b a, ...: neither always goes first
        if i % 2 == 0:
            x, y = a().ms, b().ms
        else:
            y, x = b().ms, a().ms
        ma.append(x)
        mb.append(y)
    ratios = [y / x for x, y in zip(ma, mb)]
    # consecutive rounds ran in opposite orders: their geometric mean cancels a steady drift,
    # and the median over those pairs ignores a round that something disturbed
    pairs = [math.sqrt(r * s) for r, s in zip(ratios, ratios[1:])] or ratios
    return PairedMeasurement(statistics.median(ma), statistics.median(mb),
                             statistics.median(pairs), max(ratios) - min(ratios), rounds)
