"""Seeded search instances with the shapes of a real fitness table and LUT (tests, and
benchmarks/search_speed.py, which imports them from here)."""

from __future__ import annotations

import numpy as np

__all__ = ["make_instance", "as_arrays"]


def make_instance(
    layers: int = 46, ops: int = 197, seed: int = 0
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """A seeded (a, b) pair with the shapes of a real fitness table and LUT.

    Layer i has a teacher latency t_i (log-normal, ~1 ms) and a sensitivity s_i (log-normal;
    a few layers, like the downsampling ones, are much more sensitive). Op j has a global cost
    ratio r_j and quality q_j; in layer i it costs t_i * r (r = r_j with per-layer noise on its
    logit, so always below the teacher's cost, as the issue asks and as after HANT's prefilter)
    and loses about s_i * (1 - r) ** 1.5 / q_j (with noise). "identity" is nearly free and very
    lossy. Noise makes many ops dominated.

    Until session 3 the per-layer noise was multiplicative and clipped at 1.0, which made ~25
    ops per layer exact clones of each other (loss 1e-4, the teacher's latency); the figures in
    BENCHMARKS.md say which generator they used.
    """
    rng = np.random.default_rng(seed)
    t = rng.lognormal(0.0, 0.6, layers)
    sens = 0.02 * rng.lognormal(0.0, 0.8, layers)
    m = ops - 2  # besides teacher and identity
    ratio = rng.uniform(0.05, 0.95, m)
    quality = rng.lognormal(0.0, 0.5, m)
    a, b = [], []
    logit = np.log(ratio / (1.0 - ratio))
    for i in range(layers):
        r = np.maximum(1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, 0.3, m)))), 0.02)
        loss = sens[i] * (1.0 - r) ** 1.5 / quality * rng.lognormal(0.0, 0.4, m) + 1e-4
        a.append({"teacher": 0.0, "identity": float(sens[i] * 4.0),
                  **{f"op{j:03d}": float(loss[j]) for j in range(m)}})
        b.append({"teacher": float(t[i]), "identity": float(t[i] * 0.01),
                  **{f"op{j:03d}": float(t[i] * r[j]) for j in range(m)}})
    return a, b


def as_arrays(a, b) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """The op names of each layer (sorted) and the loss and latency tables in that order.

    For instances with the same number of ops in every layer, as `make_instance` builds."""
    names = [sorted(layer) for layer in a]
    return (names, np.array([[a[i][op] for op in ops] for i, ops in enumerate(names)]),
            np.array([[b[i][op] for op in ops] for i, ops in enumerate(names)]))
