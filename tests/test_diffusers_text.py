"""Text-to-image teachers (issue 32): a tiny random Stable Diffusion pipeline made here (nothing is
downloaded) as an EDM denoiser D(x; sigma, c). D equals the scheduler's x0 prediction at its
timesteps for each prediction type; classifier-free guidance in x0 equals SiD-LSG's epsilon-space
guidance; the text encoder gives the pipeline's own prompt embeddings; the SiDA return flags
slice the prompt embeddings with the batch; the folder check names the fix in one line. About 20 s."""

from __future__ import annotations

import pytest
import torch

from sd_assets import make_tiny_sd_pipeline, save_tiny_sd_pipeline, vp_batch
from sida.errors import AssetError


def wrap(pipe):
    """The wrapper around an in-memory pipeline's UNet, `uncond` from its own text encoder."""
    from sida.io.text_encoder import TextEncoder
    from sida.nets.diffusers_text import DiffusersTextPrecond

    cfg = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    enc = TextEncoder(pipe.tokenizer, pipe.text_encoder)
    net = DiffusersTextPrecond(cfg, pipe.scheduler.alphas_cumprod.double().tolist(),
                               pipe.scheduler.config.prediction_type, cond_shape=enc.cond_shape)
    net.model.unet.load_state_dict(pipe.unet.state_dict())
    net.uncond.copy_(enc.encode([""]))
    return net.eval(), enc


PROMPTS = ["the dog", "a cat and the dog", "photo", "x"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction", "sample"])
def tiny(request):
    pipe = make_tiny_sd_pipeline(request.param)
    net, enc = wrap(pipe)
    with torch.no_grad():
        return pipe, net, enc.encode(PROMPTS)


def test_denoiser_is_the_schedulers_x0_prediction(tiny):
    pipe, net, cond = tiny
    sched = pipe.scheduler
    for t in (0, 1, 625, 999):
        x_vp, x, sigma = vp_batch(sched, t)
        with torch.no_grad():
            ref = sched.step(pipe.unet(x_vp, t, encoder_hidden_states=cond).sample, t, x_vp).pred_original_sample
            d = net(x, sigma, cond)
        torch.testing.assert_close(d, ref, atol=1e-5 * (1 + sigma), rtol=1e-5)
    assert net.timestep(torch.tensor([net.sigma_at(625)])).item() == pytest.approx(625, abs=2e-3)
    assert net.sigma_at(625) == pytest.approx(2.5, abs=0.02)  # SiD-LSG's sigma_init on SD's schedule


@pytest.mark.parametrize("scale", [1.0, 1.5, 4.5])
def test_guidance_is_sid_lsg_epsilon_guidance(tiny, scale):
    """D_u + k (D_c - D_u) is the x0 of the guided UNet output eps_u + k (eps_c - eps_u) (v and x0
    predictions alike), in one batched pass of 2n (n when k = 1)."""
    from sida.nets.guidance import guided

    pipe, net, cond = tiny
    sched, calls = pipe.scheduler, []
    hook = net.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    t = 625
    x_vp, x, sigma = vp_batch(sched, t, seed=1)
    with torch.no_grad():
        f_u = pipe.unet(x_vp, t, encoder_hidden_states=net.uncond.expand(4, -1, -1)).sample
        f_c = pipe.unet(x_vp, t, encoder_hidden_states=cond).sample
        ref = sched.step(f_u + scale * (f_c - f_u), t, x_vp).pred_original_sample
        d = guided(net, x, sigma, cond, scale)
        d2, logits = guided(net, x, torch.full([4], sigma), cond, scale, return_flag="encoder_decoder")
    hook.remove()
    torch.testing.assert_close(d, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d2, d)
    torch.testing.assert_close(logits, net(x, sigma, cond, return_flag="encoder"))
    assert calls == ([4, 4] if scale == 1 else [8, 8])


def test_guidance_hand_computed():
    """A denoiser whose output is the mean of its condition: uncond 0, cond 1 and 3 per sample ->
    D_u = 0, D_c = 1, 3; guided at 4.5 = 4.5, 13.5 (the encoder flags are refused)."""
    from sida.nets.guidance import guided

    class Mean(torch.nn.Module):
        cond_shape = (2, 3)

        def __init__(self):
            super().__init__()
            self.register_buffer("uncond", torch.zeros(1, 2, 3))

        def condition(self, cond, n, device):
            return cond

        def forward(self, x, sigma, cond, return_flag="decoder"):
            return x * 0 + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    cond = torch.stack([torch.ones(2, 3), 3 * torch.ones(2, 3)])
    out = guided(Mean(), torch.zeros(2, 1, 2, 2), 1.0, cond, 4.5)
    assert out[:, 0, 0, 0].tolist() == [4.5, 13.5]
    with pytest.raises(ValueError, match="return_flag must be 'decoder' or 'encoder_decoder'"):
        guided(Mean(), torch.zeros(2, 1, 2, 2), 1.0, cond, 2.0, return_flag="encoder")


def test_condition_defaults_broadcasts_and_return_flags(tiny):
    from sida.io.checkpoints import network_from_record, network_record
    from sida.nets.build import clone_with_dropout

    _, net, cond = tiny
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g) * 5 + 0.1
    with torch.no_grad():
        d_all = net(x, sigma, cond)
        d, logits = net(x, sigma, cond, return_flag="encoder_decoder", decode_first=2)
        enc = net(x, sigma, cond, return_flag="encoder")
        feats = net(x, sigma, cond, return_flag="encoder_features")
        d_none = net(x, sigma, None)
        d_bcast = net(x, sigma, net.uncond)
        d_two = net(x[:2], sigma[:2], cond[:2])
    # The decoder's cross-attention saw the first two prompts (other batch sizes round differently).
    torch.testing.assert_close(d, d_two, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d, d_all[:2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, enc)
    assert logits.shape == (4, 1, 4, 4) and feats[-1].shape == (4, 32, 4, 4)
    assert torch.equal(d_none, d_bcast) and not torch.allclose(d_none, d_all)
    with pytest.raises(ValueError, match=r"prompt embeddings of shape \[4, 16, 32\]"):
        net(x, sigma, cond[:, :3])
    again = network_from_record(network_record(net))  # uncond travels in the state dict
    clone = clone_with_dropout(net, 0.1)
    assert torch.equal(again.uncond, net.uncond) and clone.model.unet.config.dropout == 0.1
    with torch.no_grad():
        assert torch.equal(again(x, sigma, cond), d_all) and torch.equal(clone.eval()(x, sigma, cond), d_all)


def test_text_encoder_matches_the_pipeline(tmp_path):
    from sida.io.text_encoder import load_text_encoder

    pipe = make_tiny_sd_pipeline()
    save_tiny_sd_pipeline(tmp_path / "sd")
    enc = load_text_encoder(tmp_path / "sd")
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS + ["a " * 40], "cpu", 1, False)
        out = enc.encode(PROMPTS + ["a " * 40])  # the long prompt is truncated to 16 tokens
    assert out.shape == (5, 16, 32) and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, ref)
    with pytest.raises(AssetError, match="text encoder of .* cannot be loaded"):
        load_text_encoder(tmp_path)


@pytest.mark.parametrize("vae", [True, False])
def test_load_teacher_and_vae(tmp_path, vae):
    from sida.io.diffusers_teacher import check_folder, load_teacher
    from sida.io.latent_vae import load_vae

    folder = save_tiny_sd_pipeline(tmp_path / "sd", "v_prediction", vae=vae)
    info = check_folder(folder)
    assert info.kind == "text" and info.text_encoder_dir == folder / "text_encoder"
    assert info.tokenizer_dir == folder / "tokenizer" and info.vae_dir == (folder / "vae" if vae else None)
    net = load_teacher(folder)
    pipe = make_tiny_sd_pipeline("v_prediction", vae=vae)
    ref, _ = wrap(pipe)
    x = torch.randn(2, net.img_channels, 8, 8)
    assert type(net).__name__ == "DiffusersTextPrecond" and net.label_dim == 0 and net.cond_shape == (16, 32)
    assert net.img_channels == (4 if vae else 1) and net.pipeline_dir == str(folder.resolve())
    with torch.no_grad():
        assert torch.equal(net.uncond, ref.uncond) and torch.equal(net(x, 2.5), ref(x, 2.5))
    if vae:  # the pipeline's latents: posterior mean x 0.18215; decode clamps like the pipeline
        lv = load_vae(folder)
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            lat = lv.encode(images)
            torch.testing.assert_close(lat, pipe.vae.encode(images).latent_dist.mean * 0.18215)
            torch.testing.assert_close(lv.decode(lat), pipe.vae.decode(lat / 0.18215).sample.clamp(-1, 1))
        assert lat.shape == (2, 4, 8, 8)
    else:
        with pytest.raises(AssetError, match="VAE .* cannot be loaded"):
            load_vae(folder)


def _write(folder, rel, data):
    import json

    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case,needle", [
    ("no_text_encoder", "has no text_encoder/: place the pipeline's text_encoder/ there"),
    ("no_tokenizer", "has no tokenizer/"), ("no_unet", "has no unet/config.json"),
    ("no_scheduler", "scheduler_config.json is missing"),
    ("width", "hidden_size 64 (.*) differs from the UNet's cross_attention_dim 32"),
    ("added", "addition_embed_type 'image': only SD 1.x / 2.x UNets (none) and SDXL's ('text_time') are"),
    ("bare", "a bare UNet2DConditionModel: set teacher.path to its pipeline folder"),
    ("blocks", "down_block_types SimpleCrossAttnDownBlock2D: only SD 1.x / 2.x and SDXL blocks (CrossAttnDownBlock2D,"),
    ("flow", "scheduler 'FlowMatchEulerDiscreteScheduler'")])
def test_bad_text_pipelines_give_one_line(tmp_path, case, needle):
    import re

    from sida.io.diffusers_teacher import check_folder

    root = tmp_path / "sd"
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "cross_attention_dim": 32}
    if case == "added":
        unet["addition_embed_type"] = "image"
    if case == "blocks":
        unet["down_block_types"] = ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]
    if case == "bare":
        _write(root, "config.json", unet)
    if case != "no_unet" and case != "bare":
        _write(root, "unet/config.json", unet)
    if case not in ("no_scheduler", "bare"):
        _write(root, "scheduler/scheduler_config.json",
               {"_class_name": "FlowMatchEulerDiscreteScheduler" if case == "flow" else "PNDMScheduler"})
    if case != "no_text_encoder":
        _write(root, "text_encoder/config.json", {"hidden_size": 64 if case == "width" else 32})
    if case != "no_tokenizer":
        _write(root, "tokenizer/tokenizer_config.json", {})
    _write(root, "model_index.json", {"_class_name": "StableDiffusionPipeline"})
    with pytest.raises(AssetError) as exc:
        check_folder(root)
    assert re.search(needle if case == "width" else re.escape(needle), str(exc.value)), str(exc.value)
    assert "\n" not in str(exc.value)


def test_hub_download_and_offline_line(tmp_path, monkeypatch):
    """teacher.hub through the fetch stage (snapshot_download patched: no network is touched): an
    unreachable hub is one line naming the folder layout and teacher.path; a download lands in the
    cache with only the listed parts; a finished download is used without asking the hub again."""
    import huggingface_hub

    from sida.io.checkpoints import load_network
    from stages.fetch import fetch

    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    def online(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(save_tiny_sd_pipeline(kwargs["local_dir"], vae=False))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    cfg = {"experiment": "x", "fetch": {"cache_dir": str(tmp_path / "cache")},
           "teacher": {"source": "diffusers", "path": None, "url": None, "hub": "org/tiny-sd"}}
    with pytest.raises(AssetError) as exc:
        fetch(cfg, tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg and "'org/tiny-sd' could not be downloaded (Failed to resolve" in msg
    assert "set teacher.path to a folder with unet/, text_encoder/, tokenizer/, scheduler/ and" in msg
    assert calls[0][0] == "org/tiny-sd" and "unet/diffusion_pytorch_model.safetensors" in calls[0][1]["allow_patterns"]
    assert not any("fp16" in p or p.endswith(".bin") for p in calls[0][1]["allow_patterns"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", online)
    fetch(cfg, tmp_path / "out")
    assert calls[1][1]["local_dir"] == str(tmp_path / "cache" / "teacher")
    net = load_network(tmp_path / "out" / "teacher.pt")
    assert type(net).__name__ == "DiffusersTextPrecond" and net.uncond.abs().sum() > 0
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    fetch(cfg, tmp_path / "out")  # offline again: the cached folder is complete
    assert len(calls) == 2


def test_pixel_folders_are_pixel_kind(tmp_path):
    from diffusers_assets import save_tiny_teacher
    from sida.io.diffusers_teacher import check_folder

    info = check_folder(save_tiny_teacher(tmp_path / "m"))
    assert info.kind == "pixel" and info.text_encoder_dir is None and info.tokenizer_dir is None
    assert info.vae_dir is None


def test_network_refuses_sdxl_unets_and_other_widths():
    from sd_assets import tiny_unet_config
    from sida.nets.diffusers_text import DiffusersTextPrecond

    cfg = dict(tiny_unet_config(4), addition_embed_type="text_time")
    with pytest.raises(ValueError, match=r"an SDXL UNet\): load it from its StableDiffusionXLPipeline folder"):
        DiffusersTextPrecond(cfg, [0.9, 0.5], cond_shape=(16, 32))
    with pytest.raises(ValueError, match="width 64 must be the UNet's cross_attention_dim 32"):
        DiffusersTextPrecond(tiny_unet_config(4), [0.9, 0.5], cond_shape=(16, 64))
