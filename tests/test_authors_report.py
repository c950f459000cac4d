"""bench.authors_report: docs/authors-code.md's tables from the runs' files (synthetic runs with
the page's final FDs reproduce its Welch line), and a missing file is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.authors_report import main, welch
from sida.errors import ConfigError

OURS = {0: 8.055, 1: 5.950, 2: 6.733}  # docs/authors-code.md, results table
THEIRS = {0: 7.842, 1: 6.210, 2: 7.371}
EVAL_SEEDS = [[0, 5119], [5120, 10239], [10240, 15359]]


def _evaluation(path: Path, fd: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"fd": {"mean": fd, "se": 0.05}, "precision": {"mean": 0.85}, "recall": {"mean": 0.86}}
    path.write_text(json.dumps({"metric": "fd", "seeds": EVAL_SEEDS, "summary": summary}))


def _curve(path: Path, final: float, loss_fake: float) -> None:
    """A sida run's metrics.jsonl: ticks every 1.024 kimg, quick FD at 3.072 and 16 in-run kimg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"kimg": 1.024, "phase": "warmup", "loss_fake": loss_fake, "loss_d": 100.0},
            {"kimg": 3.072, "phase": "sid", "loss_fake": loss_fake, "loss_d": 100.0, "fd": 92.6},
            {"kimg": 16.0, "phase": "sida", "loss_fake": loss_fake, "loss_d": 100.0, "fd": final},
            {"kimg": 16.0, "final/kimg": 16.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _runs(tmp_path: Path) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for k in OURS:
        _curve(ours / f"seed{k}" / "sida" / "metrics.jsonl", OURS[k], 27.5)
        _evaluation(ours / "evaluate" / f"seed{k}" / "sida" / "metrics.json", OURS[k])
        _curve(theirs / f"seed{k}" / "sida" / "metrics.jsonl", THEIRS[k], 0.0)
        _evaluation(theirs / "evaluate" / f"seed{k}" / "sida-authors" / "metrics.json", THEIRS[k])
        stats = theirs / f"seed{k}" / "sida" / "authors_run" / "sida" / "stats_1.200000.jsonl"
        stats.parent.mkdir(parents=True)
        stats.write_text("".join(json.dumps({"fake_score_Loss/loss": {"num": n, "mean": m}, "D_Loss/loss":
                                             {"num": n, "mean": 130.0}}) + "\n" for n, m in ((1, 10.0), (249, 27.0))))
    return ours, theirs


def test_the_page_tables_come_from_the_files(tmp_path, capsys):
    ours, theirs = _runs(tmp_path)
    main(["--ours", str(ours), "--theirs", str(theirs), "--seeds", "0,1,2"])
    out = capsys.readouterr().out
    # The page's final-FD comparison: +0.23, [-1.99, +2.45], df 3.8, p 0.79.
    assert "**authors − ours: +0.23 FD, Welch 95 % interval [-1.99, +2.45]** (df 3.8, p = 0.79)" in out
    assert "| ours | 0, 1, 2 | 8.055 ± 0.050, 5.950 ± 0.050, 6.733 ± 0.050 | **6.913 ± 1.064** | 18, 18, 18 |" in out
    assert "| authors | 0, 1, 2 |" in out and "**7.141 ± 0.840**" in out
    # Quick-FD points count the 2 kimg shared warm-up; the phase is the sida run's.
    assert "| 5.072 | sid | 92.60 ± 0.00 | 92.60 ± 0.00 | +0.00 |" in out
    assert "| 18 | sida | 6.91 ± 1.06 | 7.14 ± 0.84 | +0.23 | [-1.99, +2.45] |" in out
    assert "ours    0  5.072:92.60 18:8.05\n" in out and "authors 2  5.072:92.60 18:7.37\n" in out
    # Losses: ours weighted by the images of each tick, theirs by their log's counts.
    assert "fake-score loss 27.50 / 27.50 / 27.50" in out and "against 26.93 / 26.93 / 26.93" in out


def test_welch_is_the_textbook_one():
    d, iv, df, p = welch([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])  # equal variances, n 3 + 3: df 4, se sqrt(2/3)
    assert d == pytest.approx(1.0) and df == pytest.approx(4.0)
    assert iv == pytest.approx([1 - 2.776445 * (2 / 3) ** 0.5, 1 + 2.776445 * (2 / 3) ** 0.5], rel=1e-5)
    assert p == pytest.approx(0.2879, abs=1e-3)  # t = 1.2247 on 4 df


def test_a_missing_file_is_one_line(tmp_path):
    ours, theirs = _runs(tmp_path)
    (theirs / "evaluate" / "seed2" / "sida-authors" / "metrics.json").unlink()
    with pytest.raises(ConfigError) as exc:
        main(["--ours", str(ours), "--theirs", str(theirs), "--seeds", "0,1,2"])
    assert "seed2/sida-authors/metrics.json does not exist: the evaluate stage writes it" in str(exc.value)
    assert "\n" not in str(exc.value)
