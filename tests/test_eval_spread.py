"""bench.eval_spread: one network's FD spread over evaluation runs per noise kind, JSON last."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra):
    cmd = [sys.executable, "-m", "bench.eval_spread", "--config", str(ROOT / "config" / "config.yaml"),
           "--network", str(tmp_path / "net.pt"), "--set", f"results_dir={tmp_path / 'results'}",
           "--set", "evaluate.classifier.epochs=3", "--set", "evaluate.batch=64", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_eval_spread_compares_noise_kinds(tmp_path):
    from sida.io.checkpoints import save_network
    from sida.nets.precond import EDMPrecond

    torch.manual_seed(0)
    save_network(tmp_path / "net.pt", EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet",
                                                 model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    out = _run(tmp_path, "--runs", "2", "--samples", "40", "--latents", "iid,sobol")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    rows = {r["latents"]: r for r in result["results"]}
    assert set(rows) == {"iid", "sobol"} and all(len(r["values"]) == 2 and r["samples"] == 40 for r in rows.values())
    for r in rows.values():
        assert r["std"] > 0 and abs(r["relative_std"] - r["std"] / r["mean"]) < 1e-12
    assert rows["iid"]["values"] != rows["sobol"]["values"]  # different noise, different samples
    assert any("sobol" in line and "% of the mean" in line for line in lines[:-1])
    # bad arguments: one error line each
    for extra, words in ((["--runs", "1"], "at least 2 runs"), (["--samples", "45"], "multiples of 10"),
                         (["--latents", "halton"], "unknown")):
        bad = _run(tmp_path, *extra)
        assert bad.returncode == 1 and bad.stderr.strip().startswith("error: ") and words in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
