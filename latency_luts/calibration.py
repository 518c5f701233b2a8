"""Fitting a LUT's calibration: whole networks measured end to end against their LUT sums.

Example:
    >>> from latency_luts.calibration import fit_calibration
    >>> c = fit_calibration([10.0, 20.0, 30.0], [8.0, 16.0, 24.0])
    >>> round(c["scale"], 3), round(c["offset_ms"], 3)
    (0.8, 0.0)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["fit_calibration"]


def _pct(pred: Sequence[float], meas: Sequence[float]) -> list[float]:
    return [100.0 * abs(p - m) / m for p, m in zip(pred, meas)]


def fit_calibration(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """Least-squares ``measured ~ offset_ms + scale * predicted`` over networks (LUT sums with
    the per-call overhead, and their end-to-end times); the offset is dropped (scale alone,
    through the origin) when the sums span too little to tell the two apart or the fit would
    make a network's time negative. Returns the calibration dict a `LUT` stores, with the
    median absolute error of the raw sums and of the fit on these networks.

    Raises:
        ValueError: fewer than 3 networks, or a time that is not positive.
    """
    p, m = [float(v) for v in predicted], [float(v) for v in measured]
    if len(p) != len(m) or len(p) < 3:
        raise ValueError(f"a calibration needs 3 or more networks, got {len(p)}")
    if min(p) <= 0 or min(m) <= 0:
        raise ValueError("latencies must be positive")
    mp, mm = statistics.fmean(p), statistics.fmean(m)
    var = sum((x - mp) ** 2 for x in p)
    scale, offset = sum(x * y for x, y in zip(p, m)) / sum(x * x for x in p), 0.0
    if var > (0.05 * mp) ** 2 * len(p):  # sums spread over more than ~5 %: fit the offset too
        s2 = sum((x - mp) * (y - mm) for x, y in zip(p, m)) / var
        a2 = mm - s2 * mp
        if s2 > 0 and a2 + s2 * min(p) * 0.5 > 0:
            scale, offset = s2, a2
    fitted = [offset + scale * x for x in p]
    return {"scale": scale, "offset_ms": offset, "archs": len(p),
            "raw_median_abs_err_pct": round(statistics.median(_pct(p, m)), 2),
            "fit_median_abs_err_pct": round(statistics.median(_pct(fitted, m)), 2)}
