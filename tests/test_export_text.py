"""Exported text-to-image generators (issue 32): `python -m stages.export` of a generator distilled
from a tiny random SD pipeline (nothing downloaded) writes a folder that
`StableDiffusionPipeline.from_pretrained` loads and that, called as the README says (one step at
timestep 625, latents sqrt(1 - abar) z, no guidance), gives the images of `sida.load_generator`.
A pipeline without a VAE exports its parts and a hand formula instead. About 25 s."""

from __future__ import annotations

import json

import pytest
import torch

from sd_assets import save_tiny_sd_pipeline

PROMPTS = ["the dog", "a cat and the dog"]


def _export(tmp_path, pred, vae=True, teacher=None):
    """A 'generator' = the teacher itself (distillation changes weights, not the format)."""
    from sida.io.checkpoints import save_network
    from sida.io.diffusers_teacher import load_teacher
    from stages.export import main

    folder = save_tiny_sd_pipeline(tmp_path / "sd", pred, vae=vae)
    net = load_teacher(folder)
    sigma = net.sigma_at(625)  # SiD-LSG's integer init timestep: sigma_init ~ 2.5
    save_network(tmp_path / "network.pt", net, meta={"gen_sigmas": [sigma], "sigma_init": sigma, "one_step": True})
    main(["--network", str(tmp_path / "network.pt"), "--out", str(tmp_path / "export")]
         + (["--teacher", str(teacher)] if teacher else []))
    return net, sigma


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_stable_diffusion_pipeline_gives_the_generators_images(tmp_path, pred):
    import sida
    from diffusers import StableDiffusionPipeline

    from sida.nets.sampler import one_step_generate

    net, sigma = _export(tmp_path, pred)
    out = tmp_path / "export"
    G = sida.load_generator(out)
    cfg = json.loads((out / "generator.json").read_text())
    assert cfg["text"]["int_timestep"] == 625 and cfg["text"]["vae"] and G.img_shape == (4, 8, 8)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images, latents = G(z, prompts=PROMPTS), G(z, prompts=PROMPTS, decode=False)
        cond = G.encoder.encode(PROMPTS)
        assert torch.equal(G(z, cond=cond, decode=False), latents)
        assert torch.equal(latents, one_step_generate(net, z, cond, sigma_init=sigma))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    pipe = StableDiffusionPipeline.from_pretrained(out)
    scale = cfg["text"]["latent_scale"]
    assert scale == pytest.approx((1 - float(pipe.scheduler.alphas_cumprod[625])) ** 0.5, rel=1e-6)
    call = dict(num_inference_steps=1, timesteps=[625], guidance_scale=1.0)
    with torch.no_grad():
        ref_lat = pipe(PROMPTS, latents=scale * z, output_type="latent", **call).images
        ref = pipe(PROMPTS, latents=scale * z, output_type="pt", **call).images
    # The pipeline feeds the integer timestep 625; ours is t(sigma_625), 625 up to float32 rounding.
    torch.testing.assert_close(latents, ref_lat, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(images, ref * 2 - 1, atol=1e-4, rtol=1e-4)
    readme = (out / "README.md").read_text()
    assert f"timesteps=[625], latents={scale!r} * z, guidance_scale=1.0" in readme
    assert "G(z, prompts=" in readme and "between two integer ones" not in readme


def test_pixel_text_generator_and_missing_teacher(tmp_path):
    import diffusers

    import sida
    from sida.errors import AssetError

    net, sigma = _export(tmp_path, "sample", vae=False)
    out = tmp_path / "export"
    assert not (out / "model_index.json").exists() and not (out / "vae").exists()
    assert "not a StableDiffusionPipeline" in (out / "README.md").read_text()
    G = sida.load_generator(out)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", low_cpu_mem_usage=False).eval()
    sched = diffusers.DDPMScheduler.from_pretrained(out / "scheduler")
    sched.set_timesteps(timesteps=[625])
    with torch.no_grad():
        images, cond = G(z, prompts=PROMPTS), G.encoder.encode(PROMPTS)
        x = G.config["text"]["latent_scale"] * z  # the README's formula
        ref = sched.step(unet(x, 625, encoder_hidden_states=cond).sample, 625, x).pred_original_sample
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(AssetError, match="teacher's pipeline folder .*nope .* pass it with --teacher FOLDER"):
        _export(tmp_path / "again", "epsilon", vae=False, teacher=tmp_path / "nope")
