"""catlens.formatting, the one number formatter of docs/RESULTS.md (catlens.results, missing as "n/a") and the HTML
report (catlens.report, missing as an en dash): exact strings for floats, NaN, None, pd.NA, numpy scalars, booleans,
integral floats and percents with digits, and the renderers calling these functions rather than copies."""

import math

import numpy as np
import pandas as pd
import pytest

from catlens import formatting as F

MISSING = [None, pd.NA, float("nan"), np.nan, np.float32("nan"), "not a number", [0.5]]


@pytest.mark.parametrize("x", MISSING)
def test_missing_is_decided_once(x):
    assert F.as_float(x) is None and F.as_float(x, 0.0) == 0.0
    assert F.fixed(x) == "n/a" and F.pct(x) == "n/a" and F.pct(x, unit=" %") == "n/a"  # no unit after the marker
    assert F.fixed(x, missing="–") == "–" and F.pct(x, 2, missing="–") == "–"


def test_as_float():
    assert F.as_float(0.25) == 0.25 and F.as_float("0.5") == 0.5 and F.as_float(np.float32(0.25)) == 0.25
    assert F.as_float(np.int64(3)) == 3.0 and F.as_float(True) == 1.0 and F.as_float(False) == 0.0
    assert math.copysign(1.0, F.as_float(-0.0, 0.0)) == -1.0  # a real -0.0 is a number, not the default
    assert F.as_float(float("inf")) == math.inf


def test_fixed():
    assert F.fixed(0.12345) == "0.123" and F.fixed(1.0534, 2) == "1.05" and F.fixed(2 / 3, 0) == "1"
    assert F.fixed(12.0) == "12.000" and F.fixed(-1.5) == "-1.500" and F.fixed(0) == "0.000"
    assert F.fixed(np.float64(0.25)) == "0.250" and F.fixed(np.float32(0.25)) == "0.250"
    assert F.fixed(np.int64(3)) == "3.000" and F.fixed(True) == "1.000" and F.fixed(np.bool_(False)) == "0.000"


def test_pct():
    assert F.pct(0.4167) == "41.7" and F.pct(0.4167, 2) == "41.67" and F.pct(0.5, 0) == "50"
    assert F.pct(1.0) == "100.0" and F.pct(0) == "0.0" and F.pct(0.25, unit=" %") == "25.0 %"
    assert F.pct(np.float32(0.25)) == "25.0" and F.pct(np.float64(0.125), 2) == "12.50"
    assert F.pct(True) == "100.0" and F.pct(np.int64(1)) == "100.0"


@pytest.mark.parametrize("value, text", [
    (0.125, "0.125"), (1 / 3, "0.333"), (0.0, "0.000"), (-0.5, "-0.500"), (9.0, "9.000"),  # below 10: decimals kept
    (12.0, "12"), (-12.0, "-12"), (123456.0, "123456"),  # integral from 10 up: an integer
    (12.5, "12.5"), (10.1, "10.1"), (123.456, "123.456"),  # from 10 up: trailing zeros dropped
    (123456.7, "1.23e+05"), (1e15, "1e+15"), (1e-05, "1e-05"), (0.0001, "0.0001"),  # very large or small: g form
    (float("nan"), "–"), (None, "–"), (float("inf"), "inf"),
    (np.float64(12.0), "12"), (np.float32(0.5), "0.500"), (np.float64("nan"), "–"), (np.int64(7), "7"),
    (True, "True"), (False, "False"), (np.bool_(True), "True"), (3, "3"), ("text", "text"),
    ([0.5, float("nan"), 12.0], "0.500, –, 12"), ((1, "a"), "1, a"), ({"a": 1}, '{"a": 1}'),
    (pd.NA, "–"),  # a nullable column's missing value is missing too (it was shown as "<NA>")
])
def test_fmt(value, text):
    assert F.fmt(value) == text


def test_fmt_digits_and_missing():
    assert F.fmt(0.12345, 1) == "0.1" and F.fmt(123456.7, 2) == "1.2e+05" and F.fmt([0.12345, 2 / 3], 2) == "0.12, 0.67"
    assert F.fmt(None, missing="n/a") == "n/a" and F.fmt([float("nan"), None], missing="n/a") == "n/a, n/a"


def test_the_renderers_call_these_functions():
    from catlens import report, results
    from catlens.recipes import judge_accuracy

    assert report.fmt is F.fmt and results.pct is F.pct and results.fixed is F.fixed
    assert not hasattr(results, "_pct") and not hasattr(results, "_num") and not hasattr(report, "_num")
    assert judge_accuracy._pct(0.25) == "25.0 %" and judge_accuracy._pct(float("nan")) == "n/a"
    assert judge_accuracy._pct(None) == "n/a"  # was a TypeError
