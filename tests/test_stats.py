"""Standard errors, t quantiles and paired-difference intervals against hand-computed values."""

from __future__ import annotations

import math

import pytest

from sida.eval.stats import interval, paired_difference, standard_error, summarize, t_quantile, welch_satterthwaite


def test_summarize_by_hand():
    # mean 2.5; deviations ±1.5, ±0.5: sum of squares 5, std sqrt(5/3); se = std / 2.
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4 and s["values"] == [1.0, 2.0, 3.0, 4.0]
    assert s["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert s["se"] == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    one = summarize([5.0])
    assert one["std"] == 0.0 and one["se"] is None and standard_error([5.0]) is None


def test_t_quantiles_closed_forms():
    # df 1 (Cauchy): tan(pi (p - 1/2)); df 2: (2p - 1) sqrt(2 / (4 p (1 - p))); df -> inf: the normal.
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)      # 12.7062
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / 0.0975), rel=1e-9)   # 4.3027
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_difference_interval_by_hand():
    # d = [2, 3, 1]: mean 2, std 1, se 1/sqrt(3), df 2: 2 ± 4.30265 * 0.57735 = 2 ± 2.48414 -> contains 0.
    d = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])
    t2 = 0.95 * math.sqrt(2 / 0.0975)
    assert d["mean"] == pytest.approx(2.0) and d["n"] == 3 and d["df"] == 2
    assert d["se"] == pytest.approx(1 / math.sqrt(3))
    assert d["ci"] == pytest.approx([2 - t2 / math.sqrt(3), 2 + t2 / math.sqrt(3)])
    assert d["ci"][0] < 0 and not d["significant"]
    # d = [2, 2.5, 1.5]: std 0.5, half-width 4.30265 * 0.5 / sqrt(3) = 1.24207 -> [0.758, 3.242], excludes 0.
    d = paired_difference([2.0, 2.5, 1.5], [0.0, 0.0, 0.0])
    assert d["ci"] == pytest.approx([2 - t2 * 0.5 / math.sqrt(3), 2 + t2 * 0.5 / math.sqrt(3)])
    assert d["significant"]
    # Negative differences are called too; pairing removes a shared shift that unpaired values would keep.
    d = paired_difference([10.0, 20.0, 30.0], [10.5, 20.4, 30.6])
    assert d["mean"] == pytest.approx(-0.5) and d["significant"]


def test_paired_difference_without_an_error_estimate_is_not_called():
    d = paired_difference([3.0], [1.0])
    assert d["mean"] == 2.0 and d["se"] is None and d["ci"] is None and not d["significant"]
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


def test_welch_satterthwaite_and_extra_error_terms():
    assert welch_satterthwaite([(1.0, 2.0), (1.0, 2.0)]) == pytest.approx(4.0)  # (1+1)^2 / (1/2 + 1/2)
    # (9 + 16)^2 / (81/4 + 256/9) = 625 / 48.69444
    assert welch_satterthwaite([(3.0, 4.0), (4.0, 9.0)]) == pytest.approx(625 / (81 / 4 + 256 / 9))
    assert welch_satterthwaite([(0.0, 3.0)]) is None
    # A single reference value b, compared with every a_i, plus its own error (se 0.3 on 4 df):
    # d = [1, 2, 3] - 1 = [0, 1, 2]: mean 1, se 1/sqrt(3); total se sqrt(1/3 + 0.09);
    # df = (1/3 + 0.09)^2 / ((1/3)^2 / 2 + 0.09^2 / 4).
    d = paired_difference([1.0, 2.0, 3.0], [1.0], extra=[(0.3, 4)])
    se = math.sqrt(1 / 3 + 0.09)
    df = (1 / 3 + 0.09) ** 2 / ((1 / 3) ** 2 / 2 + 0.09 ** 2 / 4)
    assert d["mean"] == pytest.approx(1.0) and d["se"] == pytest.approx(se) and d["df"] == pytest.approx(df)
    assert d["ci"] == pytest.approx(interval(1.0, se, df))
    assert interval(1.0, None, 3) is None
