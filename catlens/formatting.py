"""Numbers as text, written once: the fixed-decimal and percent forms of ``docs/RESULTS.md`` (:mod:`catlens.results`,
missing shown as ``"n/a"``) and the table-value form of the HTML report (:mod:`catlens.report`, missing shown as an
en dash). What counts as missing is decided in one place, :func:`as_float`: ``None``, ``pd.NA``, NaN and anything
``float()`` refuses; the text shown for it is the caller's ``missing``.

    >>> from catlens.formatting import fixed, pct, fmt
    >>> pct(0.4167), pct(0.4167, 2, unit=" %"), fixed(1.0534), fixed(None), fmt(float("nan")), fmt(12.0)
    ('41.7', '41.67 %', '1.053', 'n/a', '–', '12')

Importing this module imports nothing beyond the standard library (numpy only when :func:`fmt` is called)."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["DASH", "NA", "as_float", "fixed", "fmt", "pct"]

NA = "n/a"
"""The missing marker of the Markdown results (``docs/RESULTS.md``)."""
DASH = "–"
"""The missing marker of the HTML report (an en dash)."""


def as_float(x: Any, default: float | None = None) -> float | None:
    """``x`` as a float, or ``default`` when it has no number: ``None``, ``pd.NA``, NaN, or anything ``float()``
    refuses (text that is not a number, a list). Booleans and numpy scalars are numbers (``True`` is 1.0)."""
    try:
        v = float(x)
    except (TypeError, ValueError):  # None, pd.NA, "abc", [1.0]
        return default
    return default if math.isnan(v) else v


def fixed(x: Any, digits: int = 3, missing: str = NA) -> str:
    """``x`` with ``digits`` decimals (``"1.053"``), ``missing`` when it has no number (:func:`as_float`)."""
    v = as_float(x)
    return missing if v is None else f"{v:.{digits}f}"


def pct(x: Any, digits: int = 1, missing: str = NA, unit: str = "") -> str:
    """The share ``x`` as a percent with ``digits`` decimals and ``unit`` after it (``pct(0.4167)`` is ``"41.7"``),
    ``missing`` (no unit) when it has no number (:func:`as_float`)."""
    v = as_float(x)
    return missing if v is None else f"{100 * v:.{digits}f}{unit}"


def fmt(value: Any, digits: int = 3, missing: str = DASH) -> str:
    """Human form of a table value (the report's cells and sentences): ``None``, ``pd.NA`` and NaN as ``missing``;
    booleans as ``True``/``False``; numpy scalars as the Python value; floats with ``digits`` decimals
    (``0.125`` -> ``"0.125"``), integral ones from 10 up as integers (counts and seconds stored as floats:
    ``12.0`` -> ``"12"``), trailing zeros dropped from 10 up (``12.5`` -> ``"12.5"``), very large or small ones in
    ``g`` form (``1e-05``); lists and tuples element-wise joined by ``", "``; dicts as JSON; anything else as
    ``str``."""
    if value is None or type(value).__name__ == "NAType":  # pd.NA (a nullable column's missing value)
        return missing
    if isinstance(value, bool):
        return str(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float):
        if math.isnan(value):
            return missing
        if value.is_integer() and 10 <= abs(value) < 1e15:  # counts and seconds stored as floats
            return str(int(value))
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if abs(value) >= 10 else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, digits, missing) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)
