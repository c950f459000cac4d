"""The EDM2 latent path end to end (slow): config/ci-edm2.yaml runs fetch -> warmup -> sid -> sida ->
evaluate -> report with assets made here (tests/edm2_assets.py), and a latent run resumes
bit-exactly after a kill. About 3 minutes on a 2-core CPU under load (70 s of CPU time)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, Snakemake
from edm2_assets import make_ci_edm2_assets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import _kill_resume_compare  # noqa: E402

CI = REPO / "config" / "ci-edm2.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ci_edm2(tmp_path_factory):
    """The whole ci-edm2 DAG, run once for this module's tests."""
    work = tmp_path_factory.mktemp("ci-edm2")
    make_ci_edm2_assets(work / "assets" / "ci-edm2")
    sm = Snakemake(work)
    r = sm(configfile=CI, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return sm


def test_full_latent_dag(ci_edm2):
    from sida.io import checkpoints
    from sida.io.images import auto_upscale
    from sida.nets.edm2 import MPConv
    from sida.nets.precond import EDM2Precond

    exp = ci_edm2.workdir / "results" / "ci-edm2"
    manifest = json.loads((exp / "fetch" / "manifest.json").read_text())
    teacher_entry = next(a for a in manifest["assets"] if a["kind"] == "teacher")
    snap = teacher_entry["snapshot"]
    assert snap["network"] == {"class": "Precond", "stored_dtypes": ["float16"]}
    assert snap["loss"]["P_mean"] == -0.4 and snap["loss"]["P_std"] == 1.0
    np.testing.assert_allclose(snap["encoder"]["scale"], 0.5 / np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    assert (exp / "fetch" / "vae" / "config.json").is_file()
    assert {"refstats.npz", "refstats-dinov2.npz", "dinov2_vits14.pth", "teacher.pt"} <= {
        p.name for p in (exp / "fetch").iterdir()}

    teacher = checkpoints.load_network(exp / "fetch" / "teacher.pt")
    assert isinstance(teacher, EDM2Precond) and teacher.has_logvar
    for run in ("warmup", "sid", "sida"):
        state = checkpoints.load_state(exp / run / "state.pt")
        fake = checkpoints.network_from_record(state["fake"])
        assert isinstance(fake, EDM2Precond) and fake.has_logvar
        # Forced weight normalisation after every step: stored weights have unit magnitude.
        for net in (fake, checkpoints.network_from_record(state["G"])):
            for m in net.modules():
                if isinstance(m, MPConv):
                    rms = m.weight.flatten(1).pow(2).mean(1).sqrt()
                    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
        # The fake score's uncertainty head learned (it starts from the teacher's).
        assert not torch.equal(fake.logvar_linear.weight, teacher.logvar_linear.weight)
        grid = np.asarray(Image.open(exp / run / "samples.png"))
        # Decoded 16x16 RGB images, not 8x8x4 latents: grid_size 2 columns, one row per class
        # (10), cells enlarged by auto_upscale with 2-pixel gaps.
        u = auto_upscale(16)
        assert grid.shape == (10 * 16 * u + 9 * 2, 2 * 16 * u + 2, 3)
    for name in ("teacher", "sid", "sida"):
        m = json.loads((exp / "evaluate" / name / "metrics.json").read_text())
        assert m["metric"] == "fd_dinov2" and m["metric_label"] == "FD-DINOv2"
        assert m["extractor"]["feature_dim"] == 384 and np.isfinite(m["summary"]["fd_dinov2"]["mean"])
        assert m["reference"]["path"].endswith("refstats-dinov2.npz")
        assert np.asarray(Image.open(exp / "evaluate" / name / "samples.png")).shape[-1] == 3
    assert (exp / "report" / "report.md").is_file()


def test_latent_run_resumes_bit_exactly(ci_edm2, tmp_path):
    exp = ci_edm2.workdir / "results" / "ci-edm2"
    assets = ci_edm2.workdir / "assets" / "ci-edm2"
    cfg = yaml.safe_load(CI.read_text())
    cfg["data"]["path"] = str(assets / "latents.zip")
    cfg["latent"]["vae"] = str(exp / "fetch" / "vae")
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["distill"]["snapshot_kimg"] = 0.016  # a checkpoint every 2 iterations
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = ["--config", str(config), "--run", "sida", "--teacher", str(exp / "fetch" / "teacher.pt"),
            "--init", str(exp / "warmup" / "state.pt")]
    _kill_resume_compare(tmp_path, "stages.distill", args, ["G", "G_ema", "fake"])
