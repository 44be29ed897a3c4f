"""Proportion statistics shared by the metrics and the judges (no catlens imports: both use it)."""

from __future__ import annotations

from typing import Any

import numpy as np


def wilson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (statsmodels ``proportion_confint``).

    The bounds are exactly 0 at ``k = 0`` and exactly 1 at ``k = n`` (statsmodels can be one rounding step off)."""
    from statsmodels.stats.proportion import proportion_confint

    check_counts(k, n)
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r} must be a float in (0, 1) (0.05 for a 95 % interval).")
    low, high = proportion_confint(k, n, alpha=alpha, method="wilson")
    return (0.0 if k == 0 else float(low)), (1.0 if k == n else float(high))


def check_counts(k: Any, n: Any) -> None:
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}={v!r} must be an int count.")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"counts k={k}, n={n}: need n >= 1 and 0 <= k <= n.")
