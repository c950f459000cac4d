"""A text-to-image teacher end to end (slow): config/ci-sd.yaml with a tiny random Stable Diffusion
pipeline (v-prediction, a VAE from 8x8 images to 4x8x8 latents) made here runs fetch -> sid (SiD
with SiD-LSG's guidance) and sida (SiDA on captioned digits) -> evaluate (a prompt per class,
alignment) -> report -> export, and the exported folder loads in diffusers'
StableDiffusionPipeline and gives the images of sida.load_generator and of the run's network."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from sd_assets import save_captioned_digits, save_tiny_sd_pipeline

pytestmark = pytest.mark.slow


def test_text_to_image_dag(snakemake):
    import sida
    from sida.io import checkpoints
    from sida.io.text_run import text_encoder_of, vae_of
    from sida.nets.diffusers_text import DiffusersTextPrecond
    from sida.nets.sampler import one_step_generate

    save_tiny_sd_pipeline(snakemake.workdir / "assets" / "ci-sd" / "teacher", "v_prediction", digits=True)
    save_captioned_digits(snakemake.workdir / "assets" / "ci-sd" / "digits")
    r = snakemake(configfile=REPO / "config" / "ci-sd.yaml", timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    exp = snakemake.workdir / "results" / "ci-sd"
    teacher = checkpoints.load_network(exp / "fetch" / "teacher.pt")
    assert isinstance(teacher, DiffusersTextPrecond) and teacher.prediction_type == "v_prediction"
    for name, nfe in (("teacher", 10), ("sid", 1), ("sida", 1)):  # the guided teacher: 2 x (2 x 3 - 1)
        metrics = json.loads((exp / "evaluate" / name / "metrics.json").read_text())
        assert metrics["nfe"] == nfe and 0 <= metrics["summary"]["alignment"]["mean"] <= 1
    assert (exp / "report" / "report.md").is_file()

    stored = checkpoints.load_network(exp / "sid" / "network.pt")
    assert stored.sida_meta["sigma_init"] == teacher.sigma_at(625)  # init_timestep 625
    assert not torch.equal(stored.model.unet.conv_out.weight, teacher.model.unet.conv_out.weight)  # it trained
    prompts = ["a handwritten 3", "a handwritten 7"]
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        cond = text_encoder_of(teacher, "cpu").encode(prompts)
        ref = vae_of(teacher, "cpu").decode(one_step_generate(stored, z, cond, sigma_init=stored.sida_meta["sigma_init"]))
        G = sida.load_generator(exp / "export" / "sid")
        torch.testing.assert_close(G(z, prompts=prompts), ref)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exp / "export" / "sid", local_files_only=True)
    abar = pipe.scheduler.alphas_cumprod[625]
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=1, timesteps=[625], latents=(1 - abar).sqrt() * z,
                   guidance_scale=1.0, output_type="pt").images
    torch.testing.assert_close(out * 2 - 1, ref, atol=1e-4, rtol=1e-4)
