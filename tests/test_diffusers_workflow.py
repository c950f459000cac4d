"""A diffusers teacher end to end (slow): config/ci-diffusers.yaml with a tiny random UNet2DModel
(v_prediction, 10 classes) saved here runs fetch -> sida (warm-up, SiD, SiDA phases) -> evaluate
-> report -> export, and the exported generator loads back with sida.load_generator and as a
diffusers UNet2DModel, giving the run's images. About 2 minutes on a loaded 2-core CPU (6 jobs)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from diffusers_assets import save_tiny_teacher

pytestmark = pytest.mark.slow


def test_diffusers_teacher_dag(snakemake):
    import sida
    from sida.io import checkpoints
    from sida.nets.diffusers_vp import DiffusersVPPrecond
    from sida.nets.sampler import one_step_generate

    save_tiny_teacher(snakemake.workdir / "assets" / "ci-diffusers" / "teacher", "v_prediction", label_dim=10)
    r = snakemake(configfile=REPO / "config" / "ci-diffusers.yaml", timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    exp = snakemake.workdir / "results" / "ci-diffusers"
    teacher = checkpoints.load_network(exp / "fetch" / "teacher.pt")
    assert isinstance(teacher, DiffusersVPPrecond) and teacher.prediction_type == "v_prediction"
    assert (exp / "report" / "report.md").is_file()
    for name in ("teacher", "sida"):
        assert json.loads((exp / "evaluate" / name / "metrics.json").read_text())["summary"]
    stored = checkpoints.load_network(exp / "sida" / "network.pt")
    assert not torch.equal(stored.model.unet.conv_out.weight, teacher.model.unet.conv_out.weight)  # it trained
    G = sida.load_generator(exp / "export" / "sida")
    z, classes = torch.randn(4, 1, 8, 8), torch.tensor([2, 4, 6, 8])
    with torch.no_grad():
        ref = one_step_generate(stored, z, torch.nn.functional.one_hot(classes, 10).float(), sigma_init=2.5)
    assert G.sigma_init == 2.5 and torch.equal(G(z, classes), ref)
    assert (exp / "export" / "sida" / "unet" / "config.json").is_file()
