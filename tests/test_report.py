"""The report stage: table, plots, grids, results.json; missing inputs give one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "config" / "config.yaml")


def _evaluation(path: Path, name: str, kind: str, nfe: int, values: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stat = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values}
    path.write_text(json.dumps({
        "name": name, "kind": kind, "nfe": nfe, "metric": "fd", "metric_label": "FD (digits classifier)",
        "mode": "digits_classifier", "num_runs": len(values), "num_samples": 2000,
        "extractor": {"name": "digits_classifier", "sha256": "ab" * 32},
        "reference": {"sha256": "cd" * 32}, "summary": {"fd": stat, "is": stat}}))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path.parent / "samples.png")


def _inputs(tmp_path: Path):
    evals = []
    for name, kind, nfe, vals in [("sid", "generator", 1, [2.3, 2.2, 2.4]), ("teacher", "teacher", 35, [1.3, 1.4, 1.4])]:
        p = tmp_path / "evaluate" / name / "metrics.json"
        _evaluation(p, name, kind, nfe, vals)
        evals.append(p)
    jsonl = tmp_path / "sid" / "metrics.jsonl"
    jsonl.parent.mkdir(parents=True)
    jsonl.write_text("".join(json.dumps({"kimg": k, "fd": 10.0 / k, "loss_g": -k, "loss_fake": 0.5}) + "\n"
                             for k in (1, 2, 3)))
    return evals, [jsonl], [p.parent / "samples.png" for p in evals]


def test_report_writes_page_plots_and_results(tmp_path):
    from stages.report import main

    evals, jsonls, grids = _inputs(tmp_path)
    out = tmp_path / "report" / "report.md"
    main(["--config", CONFIG, "--out", str(out), "--evaluations", *map(str, evals),
          "--metrics-jsonl", *map(str, jsonls), "--grids", *map(str, grids)])
    md = out.read_text()
    assert "FD (digits classifier)" in md and "1.367 ± 0.058" in md and "not an FID" in md
    assert md.index("| teacher | teacher | 35 |") < md.index("| sid | generator | 1 |")  # teacher first
    for f in ("report.html", "results.json", "eval_vs_kimg.png", "losses_vs_kimg.png", "samples-sid.png"):
        assert (out.parent / f).is_file(), f
    res = json.loads((out.parent / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ["teacher", "sid"]
    assert "<table>" in (out.parent / "report.html").read_text()


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
