"""bench/memory.py: the Stable Diffusion parameter counts built from bench/sd_configs.py against
the published ones, the saved-tensor count, and the arithmetic of a training step's memory."""

from __future__ import annotations

import pytest
import torch

from bench import memory

# Published counts: diffusers' ModelMixin.num_parameters docstring (SD 1.5 UNet 859,520,964); the
# SD 1.5 CLIP ViT-L/14 text encoder 123,060,480 and VAE 83,653,863 and the SD 2.x UNet 865,910,724
# and OpenCLIP-H text encoder (23 layers) 340,387,840, and SDXL's UNet 2,567,463,684 and OpenCLIP-bigG
# text encoder with projection 694,659,840, as third-party code reports them (docs/memory.md).
PUBLISHED = {"sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
             "sd21base": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
             "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}}


@pytest.mark.parametrize("version", sorted(PUBLISHED))
def test_parameter_counts_are_the_published_ones(version):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    assert memory.param_counts(version) == PUBLISHED[version]


def test_saved_bytes_counts_activations_once_and_skips_parameters():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with memory.SavedBytes(lin.parameters()) as counter:
        h = lin(x)          # saves x (4x8) and the weight (a parameter: skipped)
        y = h.exp()         # saves its output (4x16)
        z = y * y           # saves y twice: one storage
    del z
    assert counter.total == 4 * (4 * 8 + 4 * 16)


ACTS = {f"{p}_{m}": {"per_call": {"full": c, "encoder": c // 2}, "per_sample": {"full": s, "encoder": s // 4}}
        for p, c0 in (("fp32", 0), ("bf16", 1000)) for m, c, s in (("trained", c0, 100), ("frozen", c0, 80))}
PARAMS = {"unet": 10, "text_encoder": 3, "vae": 2}


def _rc(**kw) -> dict:
    rc = {"ema": True, "batch_per_proc": 2, "batch": 8, "discriminator": False, "guidance_teacher": 1.5,
          "guidance_fake": 1.5, "guidance_fake_train": 1.5, "phases": [{"kind": "sid", "kimg": 1}]}
    return {**rc, **kw}


def test_sid_lsg_step_arithmetic():
    m = memory.step_memory(PARAMS, _rc(), ACTS, "bf16")
    assert m["weights"] == 4 * (4 * 10 + 3 + 2) and m["grads"] == 4 * 20 and m["adam"] == 8 * 20
    # generator step: G (2 samples) + guided teacher and fake score (one call of 4 samples each), each
    # call with its weight copies; the critic step (guided fake score, 4 samples) holds less
    assert m["activations"] == (1000 + 2 * 100) + 2 * (1000 + 4 * 80)
    assert m["total"] == m["weights"] + m["grads"] + m["adam"] + m["activations"]
    assert memory.step_memory(PARAMS, _rc(ema=False), ACTS, "fp32")["weights"] == 4 * (3 * 10 + 5)


def test_dmd2_step_arithmetic():
    rc = _rc(ema=False, guidance_fake=1.0, guidance_fake_train=1.0, discriminator="dmd2_head",
             phases=[{"kind": "dmd", "kimg": 1}, {"kind": "dmd2", "kimg": 1}])
    m = memory.step_memory(PARAMS, rc, ACTS, "fp32")
    # dmd2's critic: the fake score's denoising pass (2) + its encoder on real and generated (4)
    assert m["activations"] == 2 * 100 + 4 * 25
    gen = memory.passes(rc, "dmd2")["generator"]
    assert gen == [("trained", 1.0), ("frozen_encoder", 1.0)]


def test_the_table_names_every_text_preset():
    if not memory.ACTIVATIONS.is_file():
        pytest.skip("bench/data/sd_activations.json not measured")
    pytest.importorskip("diffusers")
    text = memory.table()
    for preset in memory.TEXT_PRESETS:
        assert f"| {preset} |" in text


def test_extrapolation_is_exact_for_a_quadratic_in_the_pixel_count():
    f = lambda r: 7 + 3 * r * r + 0.5 * r ** 4  # noqa: E731
    assert memory.extrapolate({r: f(r) for r in (8, 16, 32)}, 64) == pytest.approx(f(64))


XL_ACTS = {f"bf16_{m}": {"per_call": {"full": 1000, "encoder": 500},
                         "per_sample": {"full": f, "encoder": f // 2, "outside_blocks": o, "block_inputs": i, "max_block": b}}
           for m, f, o, i, b in (("trained", 100, 10, 20, 30), ("frozen", 80, 6, 12, 25))}
XL_PARAMS = {"unet": 16, "text_encoder": 3, "text_encoder_2": 5, "vae": 2}


def test_fsdp_per_gpu_memory_is_the_hand_count():
    from bench import memory_sdxl

    rc = _rc(batch_per_proc=1)  # SiD, guided (kappa 1.5): teacher and fake score calls of 2 samples
    m = memory_sdxl.per_gpu(XL_PARAMS, 4, rc, XL_ACTS, 4, "fsdp", False)
    # 4 UNets of 16 sharded over 4 GPUs, text encoders and VAE (10) whole; G's and the fake score's
    # gradients and two Adam moments sharded; one unit of 4 gathered: bf16 params + bf16 and fp32 grads
    assert (m["weights"], m["grads"], m["adam"], m["gathered"]) == (4 * (16 + 10), 4 * 8, 8 * 8, 8 * 4)
    # generator step, no weight copies under FSDP: G (1 sample) + teacher and fake score (2 each)
    assert m["activations"] == 100 + 2 * 80 + 2 * 80
    ck = memory_sdxl.per_gpu(XL_PARAMS, 4, rc, XL_ACTS, 4, "fsdp", True)
    # checkpointed: each call keeps (outside + block inputs) per sample; one block (the largest call's) recomputed
    assert ck["activations"] == 1 * (10 + 20) + 2 * (6 + 12) + 2 * (6 + 12) + 2 * 25
    ddp = memory_sdxl.per_gpu(XL_PARAMS, 4, rc, XL_ACTS, 4, "ddp", False)
    assert (ddp["weights"], ddp["grads"], ddp["adam"], ddp["gathered"]) == (4 * (64 + 10), 4 * 32, 8 * 32, 0)
    assert ddp["activations"] == 3 * 1000 + 100 + 2 * 80 + 2 * 80  # autocast's weight copies per call
    assert ddp["total"] == sum(v for k, v in ddp.items() if k != "total")


def test_block_shares_of_a_tiny_sdxl_style_unet():
    """measure_unet on an SDXL-style UNet (text_time added conditions): the blocks' spans and the
    root's share add up to the whole, and the checkpointed inputs are fewer bytes than the whole."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                          cross_attention_dim=8, attention_head_dim=2,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                          addition_embed_type="text_time", addition_time_embed_dim=4,
                                          projection_class_embeddings_input_dim=6 * 4 + 8)
    m = memory.measure_unet(unet, 1, 8, 8, "fp32", frozen=False)
    assert 0 < m["max_block"] < m["full"] - m["outside_blocks"] and m["encoder"] < m["full"]
    assert 0 < m["block_inputs"] < m["full"]


def test_widening_is_exact_for_bytes_linear_in_the_width():
    from bench import memory_sdxl

    f = lambda w: 630_784 + 533_504 * w  # noqa: E731  (a constant text embedding + bytes per fifth of the width)
    assert memory_sdxl.widen(f(1), f(2)) == f(5)


def test_the_sdxl_table_names_every_sdxl_preset_at_every_gpu_count():
    pytest.importorskip("diffusers")
    from bench import memory_sdxl

    text = memory_sdxl.table()
    for preset in memory_sdxl.SDXL_PRESETS:
        for world in memory_sdxl.WORLD_SIZES:
            assert f"| {preset} |" in text and f"| {world} | fsdp | on |" in text


ADD_ACTS = {**XL_ACTS, **{f"bf16_{n}": {"per_call": {"full": c}, "per_sample": {"full": f}}
                          for n, c, f in (("decoder", 7, 50), ("dinov2", 3, 20), ("heads", 1, 5),
                                          ("discriminator", 1, 9))}}
ADD_PARAMS = {**XL_PARAMS, "dinov2": 6, "heads": 4}


def _add_rc(**kw) -> dict:
    add = {"batch_per_proc": 2, "discriminator": "add", "guidance_teacher": 1.0, "guidance_fake": 1.0,
           "guidance_fake_train": 1.0, "add_features": {"kind": "dinov2", "arch": "vits14", "layers": [2, 5, 8, 11]},
           "phases": [{"kind": "add", "kimg": 1}]}
    return _rc(**{**add, **kw})


def test_add_per_gpu_memory_is_the_hand_count():
    from bench import memory_sdxl

    rc = _add_rc()
    m = memory_sdxl.per_gpu(ADD_PARAMS, 4, rc, ADD_ACTS, 4, "fsdp", False)
    # held: teacher, G, G's EMA and the idle fake-score clone (4 x 16) + the heads (4), sharded over 4;
    # whole: text encoders, VAE, DINOv2 (16). Trained: G and the heads only (a SiD run: G + fake = 32)
    assert (m["weights"], m["grads"], m["adam"]) == (4 * (68 / 4 + 16), 4 * 20 / 4, 8 * 20 / 4)
    # generator half: G (2 samples) + decoder and DINOv2, unsharded (their weight copies count
    # under FSDP) + the sharded heads; it outweighs the heads' half (2 x 9)
    assert m["activations"] == 2 * 100 + (7 + 2 * 50) + (3 + 2 * 20) + 2 * 5
    ck = memory_sdxl.per_gpu(ADD_PARAMS, 4, rc, ADD_ACTS, 4, "fsdp", True)
    # only G's blocks are checkpointed: kept (outside + inputs) per sample and one recomputed block
    assert ck["activations"] == 2 * (10 + 20) + 2 * 30 + (7 + 2 * 50) + (3 + 2 * 20) + 2 * 5
    ddp = memory_sdxl.per_gpu(ADD_PARAMS, 4, rc, ADD_ACTS, 4, "ddp", False)
    assert ddp["activations"] == (1000 + 2 * 100) + (7 + 2 * 50) + (3 + 2 * 20) + (1 + 2 * 5)
    warm = memory.passes(_add_rc(phases=[{"kind": "warmup", "kimg": 1}, {"kind": "add", "kimg": 1}]), "warmup")
    assert warm == {"generator": [], "critic": [("discriminator", 1.0)]}
    with pytest.raises(ValueError, match="teacher_encoder"):
        memory.passes(_add_rc(add_features={"kind": "teacher_encoder"}), "add")


def test_add_xl_at_8_gpus_trains_g_and_the_heads_from_the_parameter_counts():
    pytest.importorskip("diffusers")
    pytest.importorskip("timm")
    from bench import memory_sdxl

    rc = memory_sdxl.add_run()
    extra = memory_sdxl.add_param_counts(rc)
    # torch hub's dinov2_vits14 has 22,056,576 parameters (as third-party code reports it): with the
    # mask token (384, dropped by sida.nets.vit) and a position embedding for 37x37 patches (518 px);
    # at 224 px it is 16x16
    assert extra["dinov2"] == 22_056_576 - 384 - (37 * 37 - 16 * 16) * 384
    params = {**PUBLISHED["sdxl"], **extra}
    m = memory_sdxl.per_gpu(params, 1, rc, ADD_ACTS, 8, "fsdp", False)
    unet, heads = 2_567_463_684, extra["heads"]
    frozen = 123_060_480 + 694_659_840 + 83_653_863 + extra["dinov2"]
    assert m["weights"] == 4 * ((4 * unet + heads) / 8 + frozen)
    assert (m["grads"], m["adam"]) == (4 * (unet + heads) / 8, 8 * (unet + heads) / 8)
