"""SDXL teachers (issue 35 item 2): a tiny random StableDiffusionXLPipeline made here (nothing is
downloaded) as an EDM denoiser D(x; sigma, c) with c the packed condition (both encoders'
penultimate hidden states, then the pooled projection in one extra row). D equals the scheduler's
x0 prediction through diffusers' own UNet call with `added_cond_kwargs`, with and without
guidance; the pooled row and the time ids reach the UNet; the empty prompt is zeros; bad folders
are one line; the export is a StableDiffusionXLPipeline that gives the generator's images. About 45 s
on the loaded 2-core machine."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sd_assets import XL_POOLED, make_tiny_sdxl_pipeline, save_tiny_sdxl_pipeline, vp_batch
from sida.errors import AssetError

PROMPTS = ["the dog", "a cat and the dog", "photo", "x"]


def wrap(pipe, image_size=16):
    """The wrapper around an in-memory SDXL pipeline's UNet, and its two encoders."""
    from sida.io.text_encoder import SDXLTextEncoder, TextEncoder
    from sida.nets.diffusers_sdxl import DiffusersSDXLPrecond

    cfg = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    enc = SDXLTextEncoder(TextEncoder(pipe.tokenizer, pipe.text_encoder),
                          TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2))
    net = DiffusersSDXLPrecond(cfg, pipe.scheduler.alphas_cumprod.double().tolist(),
                               pipe.scheduler.config.prediction_type, cond_shape=enc.cond_shape,
                               pooled_dim=enc.pooled_dim, image_size=image_size)
    net.model.unet.load_state_dict(pipe.unet.state_dict())
    net.uncond.copy_(enc.encode([""]))
    return net.eval(), enc


def _unet_output(pipe, x_vp, t, hidden, pooled, size=16):
    """diffusers' own SDXL UNet call: time ids (size, size, 0, 0, size, size) as the pipeline's default."""
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(x_vp.shape[0], -1)
    return pipe.unet(x_vp, t, encoder_hidden_states=hidden,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def tiny(request):
    pipe = make_tiny_sdxl_pipeline(request.param)
    net, enc = wrap(pipe)
    with torch.no_grad():
        hidden, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
        return pipe, net, enc.encode(PROMPTS), (hidden, neg, pooled, neg_pooled)


def test_condition_is_the_pipelines_embeddings_packed(tiny):
    from sida.nets.diffusers_sdxl import pack_sdxl_condition, unpack_sdxl_condition

    _, net, cond, (hidden, neg, pooled, neg_pooled) = tiny
    assert cond.shape == (4, 17, 48) and net.cond_shape == (17, 48) and net.pooled_dim == XL_POOLED
    torch.testing.assert_close(cond, pack_sdxl_condition(hidden, pooled))
    h, p = unpack_sdxl_condition(cond, XL_POOLED)
    assert torch.equal(h, hidden) and torch.equal(p, pooled) and not cond[:, -1, XL_POOLED:].any()
    # The pipeline's unconditional half (force_zeros_for_empty_prompt) is our uncond: zeros.
    assert not neg.any() and not neg_pooled.any() and not net.uncond.any()


def test_denoiser_is_the_schedulers_x0_prediction(tiny):
    pipe, net, cond, (hidden, _, pooled, _) = tiny
    sched = pipe.scheduler
    for t in (0, 625, 999):
        x_vp, x, sigma = vp_batch(sched, t)
        with torch.no_grad():
            ref = sched.step(_unet_output(pipe, x_vp, t, hidden, pooled), t, x_vp).pred_original_sample
            d = net(x, sigma, cond)
        torch.testing.assert_close(d, ref, atol=1e-5 * (1 + sigma), rtol=1e-5)


@pytest.mark.parametrize("scale", [4.5])
def test_guidance_is_the_pipelines_guidance(tiny, scale):
    """D_u + k (D_c - D_u) is the x0 of eps_u + k (eps_c - eps_u), eps_u for SDXL's zero embeddings."""
    from sida.nets.guidance import guided

    pipe, net, cond, (hidden, neg, pooled, neg_pooled) = tiny
    t = 625
    x_vp, x, sigma = vp_batch(pipe.scheduler, t, seed=1)
    with torch.no_grad():
        f_u = _unet_output(pipe, x_vp, t, neg, neg_pooled)
        f_c = _unet_output(pipe, x_vp, t, hidden, pooled)
        ref = pipe.scheduler.step(f_u + scale * (f_c - f_u), t, x_vp).pred_original_sample
        d = guided(net, x, sigma, cond, scale)
    torch.testing.assert_close(d, ref, atol=1e-4, rtol=1e-4)


def test_added_conditions_reach_the_unet(tiny):
    """Changing only the pooled row, or only the resolution the time ids name, changes D; the
    SiDA return flags see the added conditions too (decode_first slices them with the batch)."""
    pipe, net, cond, _ = tiny
    bigger, _ = wrap(pipe, image_size=32)
    x, sigma = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)), 2.5
    other = cond.clone()
    other[:, -1, :XL_POOLED] = cond[:, -1, :XL_POOLED].flip(0)
    with torch.no_grad():
        d = net(x, sigma, cond)
        d_pooled, d_size = net(x, sigma, other), bigger(x, sigma, cond)
        d_first, logits = net(x, sigma, cond, return_flag="encoder_decoder", decode_first=2)
        logits_pooled = net(x, sigma, other, return_flag="encoder")
    assert (d_pooled - d).abs().max() > 1e-3 and (d_size - d).abs().max() > 1e-3
    assert (logits_pooled - logits).abs().max() > 1e-4
    torch.testing.assert_close(d_first, d[:2], atol=1e-4, rtol=1e-4)
    assert bigger.init_kwargs["image_size"] == 32 and bigger.model.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]


def test_empty_prompt_is_zeros_unless_the_pipeline_says_otherwise(tmp_path):
    from sida.io.text_encoder import load_text_encoder

    folder = save_tiny_sdxl_pipeline(tmp_path / "xl")
    with torch.no_grad():
        out = load_text_encoder(folder).encode(["", "the dog"])
    assert not out[0].any() and out[1].abs().sum() > 0
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    with torch.no_grad():
        assert load_text_encoder(folder).encode([""]).abs().sum() > 0  # the encoding of "", as the pipeline's


def test_load_teacher_records_and_clones(tmp_path):
    from sida.io.checkpoints import network_from_record, network_record
    from sida.io.diffusers_teacher import check_folder, load_teacher
    from sida.nets.build import clone_with_dropout
    from sida.io.latent_vae import load_vae

    folder = save_tiny_sdxl_pipeline(tmp_path / "xl", "v_prediction")
    info = check_folder(folder)
    assert info.kind == "sdxl" and info.vae_dir == folder / "vae" and info.text_encoder_dir == folder / "text_encoder"
    net = load_teacher(folder)
    ref, enc = wrap(make_tiny_sdxl_pipeline("v_prediction"))
    assert type(net).__name__ == "DiffusersSDXLPrecond" and net.image_size == 16 and net.pooled_dim == XL_POOLED
    assert net.cond_shape == (17, 48) and net.pipeline_dir == str(folder.resolve()) and not net.uncond.any()
    assert load_vae(folder).scaling_factor == pytest.approx(0.13025)  # SDXL's, from the VAE's config
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        cond = enc.encode(PROMPTS[:2])
        d = net(x, 2.5, cond)
        assert torch.equal(d, ref(x, 2.5, cond))
        again, clone = network_from_record(network_record(net)), clone_with_dropout(net, 0.1)
        assert torch.equal(again(x, 2.5, cond), d) and torch.equal(clone.eval()(x, 2.5, cond), d)
    assert again.image_size == 16 and clone.model.unet.config.dropout == 0.1


def _sdxl_json_folder(root, case):
    """An SDXL folder of configs only (check_folder reads JSON), broken as `case` says."""
    def write(rel, data):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    unet = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "cross_attention_dim": 48,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 48}
    write("unet/config.json", unet)
    write("scheduler/scheduler_config.json", {"_class_name": "EulerDiscreteScheduler"})
    write("model_index.json", {"_class_name": "StableDiffusionXLPipeline"})
    write("vae/config.json", {"latent_channels": 4, "block_out_channels": [8, 16]})
    write("text_encoder/config.json", {"hidden_size": 24 if case == "widths" else 16})
    write("text_encoder_2/config.json", {"hidden_size": 32, "projection_dim": 32 if case == "pooled" else 24,
                                         "architectures": ["CLIPTextModel" if case == "no_projection"
                                                           else "CLIPTextModelWithProjection"]})
    for part in ("tokenizer", "tokenizer_2"):
        write(f"{part}/tokenizer_config.json", {})
    gone = {"no_text_encoder_2": "text_encoder_2", "no_tokenizer_2": "tokenizer_2", "no_vae": "vae"}.get(case)
    if gone:
        for f in (root / gone).iterdir():
            f.unlink()
        (root / gone).rmdir()
    return root


@pytest.mark.parametrize("case,needle", [
    ("no_text_encoder_2", "has no text_encoder_2/: place the pipeline's text_encoder_2/ there (unet/, text_encoder/, "
                          "text_encoder_2/, tokenizer/, tokenizer_2/, vae/ and scheduler/, as "
                          "StableDiffusionXLPipeline.save_pretrained writes them)"),
    ("no_tokenizer_2", "has no tokenizer_2/: place the pipeline's tokenizer_2/ there"),
    ("no_vae", "has no vae/: place the pipeline's vae/ there"),
    ("widths", "the text encoders' hidden sizes 24 + 32 (text_encoder/, text_encoder_2/ of"),
    ("pooled", "the pooled text embedding's width 32 + 6 time ids x 4 differs from the UNet's add_embedding input 48"),
    ("no_projection", "SDXL's second text encoder is a CLIPTextModelWithProjection")])
def test_bad_sdxl_folders_give_one_line(tmp_path, case, needle):
    from sida.io.diffusers_teacher import check_folder

    with pytest.raises(AssetError) as exc:
        check_folder(_sdxl_json_folder(tmp_path / "xl", case))
    assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_good_sdxl_json_folder_and_network_refusals(tmp_path):
    from sd_assets import tiny_unet_config
    from sida.io.diffusers_teacher import check_folder, sdxl_image_size
    from sida.nets.diffusers_sdxl import DiffusersSDXLPrecond

    info = check_folder(_sdxl_json_folder(tmp_path / "xl", "ok"))
    assert info.kind == "sdxl" and sdxl_image_size(info) == 16
    cfg = dict(tiny_unet_config(4), cross_attention_dim=48, addition_embed_type="text_time",
               addition_time_embed_dim=4, projection_class_embeddings_input_dim=48)
    with pytest.raises(ValueError, match=re.escape("width 20 + 6 time ids x 4 differs from the UNet's add_embedding "
                                                   "input 48")):
        DiffusersSDXLPrecond(cfg, [0.9, 0.5], cond_shape=(17, 48), pooled_dim=20, image_size=16)
    with pytest.raises(ValueError, match=re.escape("addition_embed_type None: an SDXL pipeline's UNet has 'text_time'")):
        DiffusersSDXLPrecond(tiny_unet_config(4), [0.9, 0.5], cond_shape=(17, 32), pooled_dim=24, image_size=16)


@pytest.mark.parametrize("pred", ["epsilon"])  # SDXL's; the prediction type is D's, tested above
def test_export_is_a_stable_diffusion_xl_pipeline(tmp_path, pred):
    """The generator (here the teacher itself: distillation changes weights, not the format)
    exported and loaded by StableDiffusionXLPipeline, called as its README says, gives the
    images of sida.load_generator."""
    from diffusers import StableDiffusionXLPipeline

    import sida
    from sida.io.checkpoints import save_network
    from sida.io.diffusers_teacher import load_teacher
    from sida.nets.sampler import one_step_generate
    from stages.export import main

    net = load_teacher(save_tiny_sdxl_pipeline(tmp_path / "xl", pred))
    sigma = net.sigma_at(625)
    save_network(tmp_path / "network.pt", net, meta={"gen_sigmas": [sigma], "sigma_init": sigma, "one_step": True})
    out = tmp_path / "export"
    main(["--network", str(tmp_path / "network.pt"), "--out", str(out)])
    G = sida.load_generator(out)
    cfg = json.loads((out / "generator.json").read_text())
    assert cfg["class"] == "DiffusersSDXLPrecond" and cfg["text"]["pipeline_class"] == "StableDiffusionXLPipeline"
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:2]
    with torch.no_grad():
        images, latents = G(z, prompts=prompts), G(z, prompts=prompts, decode=False)
        assert torch.equal(latents, one_step_generate(net, z, G.encoder.encode(prompts), sigma_init=sigma))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    scale = cfg["text"]["latent_scale"]
    call = dict(num_inference_steps=1, timesteps=[625], guidance_scale=1.0, latents=scale * z)
    with torch.no_grad():
        ref_lat = pipe(prompts, output_type="latent", **call).images
        ref = pipe(prompts, output_type="pt", **call).images
    torch.testing.assert_close(latents, ref_lat, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(images, ref * 2 - 1, atol=1e-4, rtol=1e-4)
    readme = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained('.')" in readme and "default (16 px)" in readme
    assert f"timesteps=[625], latents={scale!r} * z, guidance_scale=1.0" in readme
