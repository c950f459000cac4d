"""The report stage: table with standard errors, paired differences, plots, grids, results.json;
training seeds; missing inputs give one error line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "config" / "config.yaml")
T2 = 0.95 * math.sqrt(2 / 0.0975)  # t quantile 0.975 with 2 degrees of freedom, closed form


def _stat(values: list[float]) -> dict:
    sd = float(np.std(values, ddof=1))
    return {"mean": float(np.mean(values)), "std": sd, "se": sd / math.sqrt(len(values)), "n": len(values),
            "values": values}


def _evaluation(path: Path, name: str, kind: str, nfe: int, values: list[float], train_seed: int | None = None,
                monitor: float | None = None, label: str | None = None, clip: list[float] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stat = _stat(values)
    path.write_text(json.dumps({
        "name": name, "kind": kind, "nfe": nfe, "train_seed": train_seed, "metric": "fd",
        "metric_label": "FD (digits classifier)", "mode": "digits_classifier", "labels": "balanced",
        "num_runs": len(values), "num_samples": 2000, "seeds": [[0, 1999], [2000, 3999], [4000, 5999]],
        "extractor": {"name": "digits_classifier", "sha256": "ab" * 32}, "reference": {"sha256": "cd" * 32},
        "summary": {"fd": stat, "is": stat, **({} if clip is None else {"clip_score": _stat(clip)})},
        "monitor": None if monitor is None else {"fd": monitor},
        **({} if label is None else {"label": label, "steps": nfe})}))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path.parent / "samples.png")


def _jsonl(path: Path, scale: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"kimg": k, "fd": scale * 10.0 / k, "loss_g_sid": -k, "loss_fake": 0.5,
                                        "d_acc_real": 0.6, "d_acc_fake": 0.7}) + "\n" for k in (1, 2, 4, 8)))
    return path


def _inputs(tmp_path: Path):
    evals = []
    for name, kind, nfe, vals in [("sid", "generator", 1, [2.3, 2.2, 2.4]), ("teacher", "teacher", 35, [1.3, 1.4, 1.4]),
                                  ("sida", "generator", 1, [2.35, 2.2, 2.5])]:
        p = tmp_path / "evaluate" / name / "metrics.json"
        _evaluation(p, name, kind, nfe, vals, monitor=3.0 if kind == "teacher" else None)
        evals.append(p)
    jsonls = [_jsonl(tmp_path / run / "metrics.jsonl", s) for run, s in (("sid", 1.0), ("sida", 0.8))]
    return evals, jsonls, [p.parent / "samples.png" for p in evals]


def _report(tmp_path, evals, jsonls, grids):
    from stages.report import main

    out = tmp_path / "report" / "report.md"
    main(["--config", CONFIG, "--out", str(out), "--evaluations", *map(str, evals),
          "--metrics-jsonl", *map(str, jsonls), "--grids", *map(str, grids)])
    return out, json.loads((out.parent / "results.json").read_text())


def test_report_writes_page_plots_and_results(tmp_path):
    evals, jsonls, grids = _inputs(tmp_path)
    out, res = _report(tmp_path, evals, jsonls, grids)
    md = out.read_text()
    # Mean ± standard error over runs: teacher 1.3667 ± 0.0577/sqrt(3) = 0.0333.
    assert "FD (digits classifier) ± SE" in md and "| teacher | 35 | 1.367 ± 0.033 |" in md and "not an FID" in md
    assert md.index("| teacher | 35 |") < md.index("| sid | 1 |") < md.index("| sida | 1 |")  # teacher first
    for f in ("report.html", "results.json", "quality_vs_images.png", "losses_vs_kimg.png",
              "discriminator_vs_kimg.png", "samples-sid.png", "samples-teacher.png"):
        assert (out.parent / f).is_file(), f
    assert [r["name"] for r in res["rows"]] == ["teacher", "sid", "sida"]
    html = (out.parent / "report.html").read_text()
    assert "<table>" in html and "image-rendering:pixelated" in html
    # The evaluation's spread on the teacher: std 0.0577 over 3 runs = 4.2 % of 1.367.
    sp = res["evaluation_spread"]
    assert sp["std"] == pytest.approx(0.057735, abs=1e-5) and sp["relative_std"] == pytest.approx(0.057735 / 1.366667, rel=1e-4)
    assert "4.2 % of its FD (digits classifier) 1.367" in md
    # and every student's: sid [2.3, 2.2, 2.4] has std 0.1 = 7.3 % of the teacher's 1.367, 4.3 % of its 2.3
    by = {m["model"]: m for m in sp["models"]}
    assert set(by) == {"teacher", "sid", "sida"}
    assert by["sid"]["std"] == pytest.approx(0.1) and by["sid"]["relative_teacher"] == pytest.approx(0.1 / 1.366667, rel=1e-4)
    assert by["sid"]["relative_own"] == pytest.approx(0.1 / 2.3, rel=1e-4)
    assert "sid 0.100 (7.3 %, 4.3 %)" in md


def test_report_paired_differences_over_evaluation_runs(tmp_path):
    evals, jsonls, grids = _inputs(tmp_path)
    _, res = _report(tmp_path, evals, jsonls, grids)
    comps = {(c["a"], c["b"]): c for c in res["comparisons"]}
    assert set(comps) == {("sid", "teacher"), ("sida", "teacher"), ("sida", "sid")}
    # sid - teacher per run: [1.0, 0.8, 1.0]: mean 0.9333, std 0.11547, se 0.066667 -> excludes 0.
    c = comps[("sid", "teacher")]
    assert c["unit"] == "evaluation runs" and c["n"] == 3
    assert c["mean"] == pytest.approx(0.933333, abs=1e-5)
    assert c["ci"] == pytest.approx([0.933333 - T2 * 0.0666667, 0.933333 + T2 * 0.0666667], abs=1e-5)
    assert c["significant"] and c["verdict"] == "teacher is better"
    # sida - sid: [0.05, 0.0, 0.1]: mean 0.05, se 0.028868 -> [-0.074, 0.174] contains 0.
    c = comps[("sida", "sid")]
    assert not c["significant"] and c["verdict"].startswith("no difference")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| sid − teacher | +0.933 |" in md


def test_report_pairs_only_evaluations_with_the_same_noise(tmp_path):
    """Sobol and iid noise of the same seeds are different samples: no pairing over runs."""
    evals, jsonls, grids = _inputs(tmp_path)
    for p in evals:  # every model on sobol noise, except sida (metrics without the key: iid)
        m = json.loads(p.read_text())
        if m["name"] != "sida":
            p.write_text(json.dumps({**m, "latents": "sobol"}))
    out, res = _report(tmp_path, evals, jsonls, grids)
    comps = {(c["a"], c["b"]): c for c in res["comparisons"]}
    assert comps[("sid", "teacher")]["unit"] == "evaluation runs"
    assert comps[("sida", "sid")]["unit"] is None and comps[("sida", "sid")]["note"] == "different evaluation latents"
    assert [r["latents"] for r in res["rows"]] == ["sobol", "sobol", "iid"]
    assert "randomized quasi-Monte Carlo" in out.read_text()


def test_report_with_training_seeds(tmp_path):
    evals = [tmp_path / "evaluate" / "teacher" / "metrics.json"]
    _evaluation(evals[0], "teacher", "teacher", 35, [1.3, 1.4, 1.4], monitor=3.0)
    per_seed = {"sid": [[2.3, 2.2, 2.4], [2.6, 2.5, 2.6], [2.0, 2.1, 2.0]],
                "sida": [[2.0, 2.1, 2.0], [2.4, 2.3, 2.3], [1.8, 1.9, 1.8]]}
    jsonls = []
    for name, runs in per_seed.items():
        for seed, vals in enumerate(runs):
            p = tmp_path / "evaluate" / f"seed{seed}" / name / "metrics.json"
            _evaluation(p, name, "generator", 1, vals, train_seed=seed)
            evals.append(p)
            jsonls.append(_jsonl(tmp_path / f"seed{seed}" / name / "metrics.jsonl", 1.0 + 0.1 * seed))
    grids = [p.parent / "samples.png" for p in evals]
    out, res = _report(tmp_path, evals, jsonls, grids)
    sid = next(r for r in res["rows"] if r["name"] == "sid")
    means = [2.3, 2.5666667, 2.0333333]
    assert sid["train_seeds"] == [0, 1, 2] and sid["value"]["mean"] == pytest.approx(np.mean(means))
    assert sid["value"]["seed_std"] == pytest.approx(np.std(means, ddof=1), rel=1e-6)
    # The evaluation's SE of one network: RMS of the per-seed SEs (0.0577, 0.0333, 0.0333).
    rms = math.sqrt((0.057735 ** 2 + 0.033333 ** 2 + 0.033333 ** 2) / 3)
    assert sid["value"]["eval_se"] == pytest.approx(rms, rel=1e-4)
    comps = {(c["a"], c["b"]): c for c in res["comparisons"]}
    # sida - sid paired by training seed: per-seed means differ by [-0.2667, -0.2333, -0.2] -> excludes 0.
    c = comps[("sida", "sid")]
    assert c["unit"] == "training seeds" and c["n"] == 3 and c["mean"] == pytest.approx(-0.233333, abs=1e-5)
    assert c["significant"] and c["verdict"] == "sida is better"
    # Against the single teacher: its evaluation error is added (Welch df between 2 and 4).
    c = comps[("sid", "teacher")]
    assert c["unit"].startswith("training seeds") and 2 < c["df"] < 4
    md = out.read_text()
    # Images to reach the teacher's monitor FD 3.0: the curves 10 s / k (s = 1, 1.1, 1.2) first get
    # there at k = 4 for every seed, plus the 2 kimg shared warm-up both runs start from.
    reach = {r["run"]: r for r in res["reach"]["runs"]}
    assert res["reach"]["threshold"] == 3.0 and reach["sid"]["per_seed"] == {"0": 6.0, "1": 6.0, "2": 6.0}
    assert "Training images to reach FD (digits classifier) ≤ 3.000" in md and "| sida | 3 of 3 | 6.0 |" in md
    assert "std over training seeds" in md and "| sid | 2.300 | 2.567 | 2.033 |" in md
    assert "samples-sid.png" in res["grids"] and "sid (training seed 0)" in md


def test_report_shows_evaluation_entries_by_label_grouped_by_training_seed(tmp_path):
    """A baseline run evaluated in 1 and 4 steps is two models (`add`, `add-4steps`), each over its
    training seeds; the page names them by their labels, the data keeps the names."""
    evals = [tmp_path / "evaluate" / "teacher" / "metrics.json"]
    _evaluation(evals[0], "teacher", "teacher", 35, [1.3, 1.4, 1.4], monitor=3.0)
    per_seed = {("add", 1, "ADD (1 step)"): [[3.0, 3.1, 3.2], [3.4, 3.3, 3.5]],
                ("add-4steps", 4, "ADD (4 steps)"): [[2.0, 2.1, 2.2], [2.3, 2.2, 2.4]]}
    for (name, nfe, label), runs in per_seed.items():
        for seed, vals in enumerate(runs):
            p = tmp_path / "evaluate" / f"seed{seed}" / name / "metrics.json"
            _evaluation(p, name, "generator", nfe, vals, train_seed=seed, label=label)
            evals.append(p)
    jsonls = [_jsonl(tmp_path / f"seed{s}" / "add" / "metrics.jsonl", 1.0) for s in (0, 1)]
    out, res = _report(tmp_path, evals, jsonls, [p.parent / "samples.png" for p in evals])
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["add-4steps"]["label"] == "ADD (4 steps)" and rows["add-4steps"]["train_seeds"] == [0, 1]
    assert rows["add-4steps"]["value"]["mean"] == pytest.approx((2.1 + 2.3) / 2)
    c = next(c for c in res["comparisons"] if (c["a"], c["b"]) == ("add-4steps", "add"))
    # per-seed means 2.1 - 3.1 and 2.3 - 3.4: paired over the 2 training seeds
    assert c["unit"] == "training seeds" and c["mean"] == pytest.approx(-1.05) and c["a_label"] == "ADD (4 steps)"
    md = out.read_text()
    assert "| ADD (4 steps) | 4 | 2.200 ± 0.100 |" in md and "| ADD (4 steps) − ADD (1 step) | -1.050 |" in md
    assert "ADD (4 steps) (training seed 0)" in md and "samples-add-4steps.png" in res["grids"]


def test_report_missing_input_is_one_error_line(tmp_path):
    evals, _, _ = _inputs(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "stages.report", "--config", CONFIG, "--out",
                           str(tmp_path / "r" / "report.md"), "--evaluations", str(evals[0]),
                           "--metrics-jsonl", str(tmp_path / "missing" / "metrics.jsonl")],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing/metrics.jsonl" in lines[0]
    assert not (tmp_path / "r" / "report.md").exists()


def test_report_refuses_a_model_evaluated_with_and_without_training_seeds(tmp_path):
    """An unseeded run's evaluation left beside a seeded sweep's (seeds added to a finished folder):
    one line naming the model, not a mean over both (it used to fail on int('None'))."""
    from sida.errors import DataError

    evals, jsonls, grids = _inputs(tmp_path)
    seeded = tmp_path / "evaluate" / "seed0" / "sid" / "metrics.json"
    _evaluation(seeded, "sid", "generator", 1, [2.0, 2.1, 2.0], train_seed=0)
    with pytest.raises(DataError, match="sid has evaluations with and without a training seed"):
        _report(tmp_path, [*evals, seeded], jsonls, grids)
    assert not (tmp_path / "report" / "report.md").exists()


def test_quality_plot_names_runs_by_their_labels(tmp_path, monkeypatch):
    """The FD-vs-images legend says 'DMD2 (mean of 2 seeds, ...)', not the run's file name."""
    from sida.eval import plots

    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.update(
        legend=[t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    rows = [{"kimg": k, "fd": 10.0 / k} for k in (1.0, 2.0, 4.0)]
    curves = {"dmd2": {0: rows, 1: rows}, "sid": {None: rows}}
    assert plots.plot_quality_vs_images(curves, ("fd",), {}, tmp_path / "q.png", "FD", ("teacher", 1.0),
                                        names={"dmd2": "DMD2", "sid": "sid"})
    assert seen["legend"][:2] == ["DMD2 (mean of 2 seeds, band min-max)", "sid"]


def test_report_clip_score_column_and_paired_differences(tmp_path):
    """Text networks scored on COCO captions: the CLIP score beside the other columns, and paired
    over the same evaluation runs where both models have one (higher is better)."""
    evals, jsonls, grids = _inputs(tmp_path)
    _evaluation(evals[0], "sid", "generator", 1, [2.3, 2.2, 2.4], clip=[0.29, 0.30, 0.30])
    _evaluation(evals[1], "teacher", "teacher", 35, [1.3, 1.4, 1.4], monitor=3.0, clip=[0.31, 0.32, 0.33])
    out, res = _report(tmp_path, evals, jsonls, grids)
    md = out.read_text()
    # teacher: mean 0.32, std 0.01, se 0.01 / sqrt(3) = 0.0058; sida has none
    assert "CLIP score ± SE" in md and "| 0.3200 ± 0.0058 |" in md
    assert [r["clip_score"] is None for r in res["rows"]] == [False, False, True]
    clip = [c for c in res["comparisons"] if c["metric"] == "clip_score"]
    # sid - teacher per run: [-0.02, -0.02, -0.03]: mean -0.02333, std 0.005774, se 0.003333
    assert [(c["a"], c["b"]) for c in clip] == [("sid", "teacher")]
    c = clip[0]
    assert c["mean"] == pytest.approx(-0.0233333, abs=1e-6) and c["n"] == 3
    assert c["ci"] == pytest.approx([-0.0233333 - T2 * 0.0033333, -0.0233333 + T2 * 0.0033333], abs=1e-6)
    assert c["verdict"] == "teacher is better"  # the higher CLIP score
    assert "Differences in CLIP score (higher is better)" in md and "| sid − teacher | -0.0233 |" in md
    assert len([c for c in res["comparisons"] if c["metric"] == "fd"]) == 3  # the main metric's pairs unchanged


def test_quality_against_text_score_plot(tmp_path):
    """A guidance sweep's picture: one point per model with a CLIP score or prompt alignment;
    no file when no model has one (class-conditional experiments)."""
    from sida.eval.plots import plot_quality_vs_text_score

    def row(name, fd, align):
        return {"name": name, "label": name, "nfe": 1, "value": {"mean": fd, "se": 0.1},
                "alignment": None if align is None else {"mean": align, "se": 0.01}}

    path = tmp_path / "q.png"
    assert plot_quality_vs_text_score([row("k1", 5.0, 0.4), row("k3", 9.0, 0.7)], path, "FD")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_quality_vs_text_score([row("sid", 5.0, None)], tmp_path / "none.png", "FD")
    assert not (tmp_path / "none.png").exists()
