"""Training images to reach a quality level (sida.eval.reach): first crossing, offsets of the runs
a method started from, censored runs, paired differences over training seeds."""

from __future__ import annotations

import math

import pytest

from sida.eval.reach import first_reach, reach_summary

T2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom


def _curve(points: list[tuple[float, float]]) -> list[dict]:
    # progress ticks without an FD in between, as a distill run's metrics.jsonl has them
    return [{"kimg": k - 0.5, "loss_g_sid": -1.0} for k, _ in points] + [{"kimg": k, "fd": v} for k, v in points]


def test_first_reach_is_the_first_point_at_or_below_the_threshold():
    recs = _curve([(2, 9.0), (4, 3.0), (6, 2.0), (8, 4.0)])
    assert first_reach(recs, "fd", 3.0) == 4.0          # equal counts as reached
    assert first_reach(recs, "fd", 2.5, offset_kimg=2.0) == 8.0   # 6 + the upstream 2
    assert first_reach(recs, "fd", 1.0) is None
    assert first_reach(list(reversed(recs)), "fd", 3.0) == 4.0  # order of the file does not matter
    assert first_reach([{"kimg": 2, "fd": float("nan")}], "fd", 3.0) is None


def test_reach_summary_pairs_seeds_and_leaves_out_censored_ones():
    curves = {
        "warmup": {0: [{"kimg": 2, "loss_fake": 1.0}], 1: [{"kimg": 2, "loss_fake": 1.0}]},
        # sid reaches FD <= 3 at 10, 12, 14 kimg of its own; sida at 4, 8, never
        "sid": {s: _curve([(k, 5.0) for k in range(2, 10 + 2 * s, 2)] + [(10 + 2 * s, 3.0)]) for s in (0, 1, 2)},
        "sida": {0: _curve([(2, 5.0), (4, 2.0)]), 1: _curve([(4, 4.0), (8, 3.0)]), 2: _curve([(4, 4.0), (16, 3.5)])},
    }
    res = reach_summary(curves, "fd", 3.0, {"sid": 2.0, "sida": 2.0})
    runs = {r["run"]: r for r in res["runs"]}
    assert set(runs) == {"sid", "sida"}  # the warm-up logs no FD
    assert runs["sid"]["per_seed"] == {"0": 12.0, "1": 14.0, "2": 16.0} and runs["sid"]["reached"] == 3
    assert runs["sid"]["mean"] == pytest.approx(14.0) and runs["sid"]["std"] == pytest.approx(2.0)
    assert runs["sida"]["per_seed"] == {"0": 6.0, "1": 10.0, "2": None} and runs["sida"]["reached"] == 2
    (c,) = res["comparisons"]
    # sida - sid over seeds 0 and 1: [-6, -4]: mean -5, se 1, t(1) interval
    assert (c["a"], c["b"], c["n"]) == ("sida", "sid", 2) and c["mean"] == pytest.approx(-5.0)
    t1 = 12.706204736174698
    assert c["ci"] == pytest.approx([-5.0 - t1, -5.0 + t1]) and not c["significant"]
    assert "1 seed(s)" in c["note"]


def test_reach_summary_interval_over_three_seeds():
    curves = {"a": {s: _curve([(4 + s, 1.0)]) for s in range(3)},      # 4, 5, 6
              "b": {s: _curve([(8 + 2 * s, 1.0)]) for s in range(3)}}  # 8, 10, 12
    (c,) = reach_summary(curves, "fd", 2.0, {})["comparisons"]
    # b - a: [4, 5, 6]: mean 5, std 1, se 1/sqrt(3)
    se = 1 / math.sqrt(3)
    assert c["mean"] == pytest.approx(5.0) and c["ci"] == pytest.approx([5 - T2 * se, 5 + T2 * se])
    assert c["significant"] and c["note"] == ""
