"""bench/memory.py: the Stable Diffusion parameter counts built from bench/sd_configs.py against
the published ones, the saved-tensor count, and the arithmetic of a training step's memory."""

from __future__ import annotations

import pytest
import torch

from bench import memory

# Published counts: diffusers' ModelMixin.num_parameters docstring (SD 1.5 UNet 859,520,964); the
# SD 1.5 CLIP ViT-L/14 text encoder 123,060,480 and VAE 83,653,863 and the SD 2.x UNet 865,910,724
# and OpenCLIP-H text encoder (23 layers) 340,387,840 as third-party code reports them (docs/memory.md).
PUBLISHED = {"sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
             "sd21base": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}}


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
