"""Uncertainty of reported numbers: standard errors and paired differences with t intervals.

Pure functions of lists of floats, tested against hand-computed values.

- `summarize(values)`: mean, sample std (ddof 1), standard error of the mean, n.
- `paired_difference(a, b)`: the mean of a_i - b_i over pairs that share their randomness (the
  same evaluation seeds, or the same training seed), its standard error and a t interval with
  n - 1 degrees of freedom. A difference "is a difference" (`significant`) only when its interval
  excludes zero. `extra` adds independent error terms (e.g. the evaluation error of a single
  teacher compared with students from several training seeds), combined in quadrature with
  Welch–Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["summarize", "standard_error", "t_quantile", "interval", "welch_satterthwaite", "paired_difference"]


def _floats(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError("need at least one value")
    return out


def _mean_std(v: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    m = math.fsum(v) / len(v)
    if len(v) < 2:
        return m, 0.0
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in v) / (len(v) - 1))


def standard_error(values: Sequence[float]) -> float | None:
    """std (ddof 1) / sqrt(n) of the mean; None for one value (no spread to estimate it from)."""
    v = _floats(values)
    return None if len(v) < 2 else _mean_std(v)[1] / math.sqrt(len(v))


def summarize(values: Sequence[float]) -> dict:
    """{'mean', 'std' (ddof 1, 0 for one value), 'se' (None for one value), 'n', 'values'}."""
    v = _floats(values)
    m, s = _mean_std(v)
    return {"mean": m, "std": s, "se": standard_error(v), "n": len(v), "values": v}


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (df may be fractional)."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    from scipy.stats import t  # scipy comes with scikit-learn (a pinned dependency)

    return float(t.ppf(p, df))


def interval(mean: float, se: float | None, df: float | None, level: float = 0.95) -> list[float] | None:
    """The two-sided `level` t interval mean ± t_{(1+level)/2, df} se; None without an se."""
    if se is None or df is None or df <= 0:
        return None
    half = t_quantile((1 + level) / 2, df) * se
    return [mean - half, mean + half]


def welch_satterthwaite(parts: Sequence[tuple[float, float]]) -> float | None:
    """Degrees of freedom of sqrt(sum se_i^2) for independent (se_i, df_i) terms:
    (sum se_i^2)^2 / sum(se_i^4 / df_i). None when every se is 0 (nothing to estimate)."""
    num = math.fsum(se ** 2 for se, _ in parts) ** 2
    den = math.fsum(se ** 4 / df for se, df in parts if se > 0)
    return None if den == 0 else num / den


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95,
                      extra: Sequence[tuple[float, float]] = ()) -> dict:
    """Mean of a_i - b_i with its standard error and `level` t interval.

    `a` and `b` are paired (same length, the i-th values share their randomness); `b` may also be
    a single value, compared with every a_i. `extra` lists independent (se, df) error terms added
    in quadrature (Welch–Satterthwaite df). Returns {'mean', 'se', 'df', 'n', 'level', 'ci',
    'significant'}; 'se'/'ci' are None and 'significant' False when nothing estimates the error.
    """
    a = _floats(a)
    b = _floats(b)
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = math.fsum(d) / len(d)
    parts = [(standard_error(d), len(d) - 1)] if len(d) > 1 else []
    parts += [(float(se), float(df)) for se, df in extra if se is not None and df and df > 0]
    se = math.sqrt(math.fsum(s ** 2 for s, _ in parts)) if parts else None
    df = parts[0][1] if len(parts) == 1 else (welch_satterthwaite(parts) if parts else None)
    ci = interval(mean, se, df, level)
    significant = ci is not None and (ci[0] > 0 or ci[1] < 0)
    return {"mean": mean, "se": se, "df": df, "n": len(d), "level": level, "ci": ci, "significant": significant}
