"""ADD on a text teacher end to end (slow): config/ci-sd.yaml's tiny random Stable Diffusion pipeline
and captioned digits with one ADD run instead of its SiD runs: fetch -> add (heads on the
teacher's encoder, projected on the prompts' text embedding; the student at the teacher's
discrete timesteps 999/749/499/249) -> evaluate in 1 and 4 steps -> report -> export."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO
from sd_assets import save_captioned_digits, save_tiny_sd_pipeline

pytestmark = pytest.mark.slow


def test_add_text_to_image_dag(snakemake):
    from sida.io import checkpoints

    save_tiny_sd_pipeline(snakemake.workdir / "assets" / "ci-sd" / "teacher", "v_prediction", digits=True)
    save_captioned_digits(snakemake.workdir / "assets" / "ci-sd" / "digits")
    cfg = yaml.safe_load((REPO / "config" / "ci-sd.yaml").read_text())
    cfg["experiment"] = "ci-sd-add"
    # DINOv2 ViT-S/14 costs tens of seconds an iteration on a CPU: the teacher's encoder stands in,
    # so the heads are projected on c_text alone (tests/test_add_text.py covers DINOv2 and c_img)
    cfg["distill"]["runs"] = {"add": {
        "init": "teacher", "discriminator": "add", "timestep_range": [0, 1000], "add_weighting": "alpha_bar",
        "add_features": {"kind": "teacher_encoder"}, "add_conditioning": ["text"], "eval_steps": [1, 4],
        "phases": [{"kind": "warmup", "kimg": 0.008}, {"kind": "add", "kimg": 0.016}]}}
    cfg["export"] = {"runs": ["add"]}
    config = snakemake.workdir / "ci-sd-add.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = snakemake(configfile=config, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    exp = snakemake.workdir / "results" / "ci-sd-add"
    teacher = checkpoints.load_network(exp / "fetch" / "teacher.pt")
    stored = checkpoints.load_network(exp / "add" / "network.pt")
    assert stored.sida_meta["gen_sigmas"] == [teacher.sigma_at(k) for k in (999, 749, 499, 249)]
    for name, nfe in (("add", 1), ("add-4steps", 4)):
        metrics = json.loads((exp / "evaluate" / name / "metrics.json").read_text())
        assert metrics["nfe"] == nfe and 0 <= metrics["summary"]["alignment"]["mean"] <= 1
    assert (exp / "report" / "report.md").is_file() and (exp / "export" / "add").is_dir()
