"""ADD on a text teacher (a tiny random Stable Diffusion pipeline, captioned digits; a tiny random
ViT in DINOv2's layout standing in for ViT-S/14, so nothing is downloaded): the heads are
projected on [c_text, c_img], c_img is the DINOv2 class token of the *real* image decoded by the
teacher's VAE, the losses recomputed by hand, R1 only on the heads' inputs, the paper's
alpha_bar_t weighting on the teacher's discrete schedule, the student's discrete timesteps, and
every conditioning ablation or bad combination in one line."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO  # noqa: E402
from sd_assets import save_captioned_digits, save_tiny_sd_pipeline  # noqa: E402

from sida.errors import ConfigError  # noqa: E402

STEPS = (999, 749, 499, 249)
GAMMA = 0.1  # R1 large enough to show in the objective (ADD's 1e-5 would vanish in float noise)


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    from sida.io.diffusers_teacher import load_teacher
    from sida.io.text_run import open_run_text_dataset

    d = tmp_path_factory.mktemp("addtext")
    folder = save_tiny_sd_pipeline(d / "teacher", "epsilon", digits=True)
    save_captioned_digits(d / "digits", count=16)
    cfg = yaml.safe_load((REPO / "config" / "ci-sd.yaml").read_text())
    cfg.update(results_dir=str(d / "results"), export={"runs": []})
    cfg["data"]["path"], cfg["teacher"]["path"] = str(d / "digits"), str(folder)
    cfg["distill"]["batch"] = 4
    teacher = load_teacher(folder)
    dataset = open_run_text_dataset(cfg["data"], teacher, "cpu", d / "cache")
    return {"cfg": cfg, "folder": folder, "dataset": dataset}


def tiny_vit() -> torch.nn.Module:
    """DINOv2's layout (patch 14 at 224 px, a class token, final norm) at a tiny width and depth."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    return VisionTransformer(img_size=224, patch_size=14, embed_dim=24, depth=3, num_heads=2, num_classes=0).eval()


def _loop(setup, features: str = "dinov2", **run_edit):
    from sida.io.diffusers_teacher import load_teacher
    from sida.io.text_run import vae_of
    from sida.run import dist
    from sida.run.config import run_config, validate
    from sida.train.loop import DistillLoop
    from sida.train.nets import init_nets
    from sida.nets.vit import DINOv2Features, PixelDecoder

    cfg = copy.deepcopy(setup["cfg"])
    run = {"init": "teacher", "discriminator": "add", "timestep_range": [0, 1000], "add_weighting": "alpha_bar",
           "r1_gamma": GAMMA, "add_features": {"kind": features}, "eval_steps": [1, 4],
           "phases": [{"kind": "add", "kimg": 0.016}]}
    run.update(run_edit)
    cfg["distill"]["runs"] = {"add": run}
    rc = run_config(validate(cfg), "add")
    teacher = load_teacher(setup["folder"]).requires_grad_(False)
    nets = init_nets(teacher, rc["dropout"])
    if features == "dinov2":  # the stage builds DINOv2 ViT-S/14 from its weights file; here a tiny one
        vae = vae_of(teacher, "cpu")
        nets.features = DINOv2Features(tiny_vit(), [0, 2], PixelDecoder(vae.vae, vae.scaling_factor))
    return DistillLoop(rc, nets, setup["dataset"], dist.init("cpu", 0), seed=0)


def _by_hand_class_token(loop, x0: torch.Tensor) -> torch.Tensor:
    """DINOv2's class token of latents x0, written out: VAE decode, [0, 1], 224 px bicubic,
    ImageNet normalisation, the ViT's final-norm token 0."""
    f = loop.nets.features
    with torch.no_grad():
        img = (f.decoder.vae.decode(x0 / f.decoder.scaling_factor).sample + 1) / 2
        img = F.interpolate(img, size=(224, 224), mode="bicubic", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
        return f.model.forward_features((img - mean) / std)[:, 0]


def test_student_steps_are_the_teachers_discrete_timesteps(text_setup):
    loop = _loop(text_setup)
    assert loop.gen_sigmas == [loop.nets.teacher.sigma_at(k) for k in STEPS]
    assert loop.rc["sigma_init"] == loop.nets.teacher.sigma_at(999)


def test_alpha_bar_weighting_is_the_teachers_alphas_cumprod_and_not_edms_alpha(text_setup):
    """ADD's c(t) = alpha_bar_t: on the teacher's discrete sigma_k, 1 / (1 + sigma_k^2) is its
    scheduler's alphas_cumprod[k]; today's `exponential` 1 / sqrt(1 + sigma^2) is sqrt of it."""
    from sida.train.baseline_losses import add_distill_weight

    loop = _loop(text_setup)
    teacher = loop.nets.teacher
    abar = torch.tensor(teacher.init_kwargs["alphas_cumprod"], dtype=torch.float64)
    k = torch.tensor([0, 249, 499, 749, 999])
    sigma = teacher.log_sigmas[k].exp()  # what Draws.timestep_sigma gives
    torch.testing.assert_close(add_distill_weight(sigma, "alpha_bar").double(), abar[k], rtol=1e-5, atol=0)
    torch.testing.assert_close(add_distill_weight(sigma, "exponential").double(), abar[k].sqrt(), rtol=1e-5, atol=0)
    assert not torch.allclose(add_distill_weight(sigma, "exponential").double(), abar[k], rtol=1e-2)


def test_heads_are_projected_on_text_and_real_image_embeddings(text_setup):
    loop = _loop(text_setup)
    m, nets = loop.method, loop.nets
    width = nets.teacher.cond_shape[1]
    assert m.parts == ("text", "image") and nets.head.heads[0].label_dim == width + 24
    slot = m.slot(0)
    x0, labels, cond = slot["x0"], slot["labels"], slot["cond"]
    torch.testing.assert_close(cond[:, :width], labels.mean(dim=1))  # c_text: the token mean (SD 1.x / 2.x)
    torch.testing.assert_close(cond[:, width:], _by_hand_class_token(loop, x0))  # c_img of the REAL image
    m.generator_loss("add", slot, 0)
    assert not torch.allclose(cond[:, width:], _by_hand_class_token(loop, slot["x_g"]), atol=1e-4)
    assert not cond.requires_grad


def test_swapping_the_prompts_changes_the_logits(text_setup):
    from sida.train.methods.add import add_logits, head_condition

    loop = _loop(text_setup)
    nets, slot = loop.nets, loop.method.slot(0)
    x0, labels = slot["x0"], slot["labels"]
    assert not torch.equal(labels[0], labels[1])  # two different captions
    swapped = labels[[1, 0, *range(2, len(labels))]]
    with torch.no_grad():
        logits = add_logits(nets.features, nets.head, x0, labels, slot["cond"])
        cond_sw = head_condition(loop.method.parts, swapped, nets.features.with_class_token(x0)[1], nets.teacher)
        logits_sw = add_logits(nets.features, nets.head, x0, swapped, cond_sw)
    assert not torch.allclose(logits[:2], logits_sw[:2], atol=1e-5)
    torch.testing.assert_close(logits[2:], logits_sw[2:])


def test_text_losses_by_hand(text_setup):
    loop = _loop(text_setup)
    m, nets, d = loop.method, loop.nets, loop.draws
    slot = m.slot(0)
    x0, labels, cond = slot["x0"], slot["labels"], slot["cond"]
    before = {k: g.get_state() for k, g in loop.gens.items()}
    loss_g, stats_g = m.generator_loss("add", slot, 0)
    for k, g in loop.gens.items():
        g.set_state(before[k])
    # the student: lambda (alpha_bar-weighted pixel mean of (x_hat - teacher's denoising of the
    # re-noised output)^2) + hinge -D, each a batch mean
    sigma_t = d.timestep_sigma(nets.teacher.log_sigmas, 0, 1000, 0)
    eps = d.randn(x0.shape, 0)
    x_hat = nets.G(slot["x_s"], slot["sigma_s"].flatten(), labels)
    with torch.no_grad():
        target = nets.teacher(x_hat + sigma_t * eps, sigma_t.flatten(), labels)
    l_dist = ((x_hat - target) ** 2 / (1 + sigma_t ** 2)).mean(dim=(1, 2, 3))
    logits_g = nets.head(nets.features(x_hat), cond)
    want_g = (2.5 * l_dist.sum() - logits_g.mean(dim=1).sum()) / d.total
    torch.testing.assert_close(loss_g, want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_g["loss_g_distill"], l_dist.sum(), rtol=1e-5, atol=1e-6)
    # the heads: hinge on real vs the student's detached output, + gamma R1 on the real features
    loss_d, stats_d = m.critic_loss(slot, 0)
    feats = [f.detach().requires_grad_(True) for f in nets.features(x0)]
    real = nets.head(feats, cond)
    grads = torch.autograd.grad(real.sum(), feats)
    r1 = sum(g.square().flatten(1).sum(dim=1) for g in grads)
    fake = nets.head(nets.features(slot["x_g"]), cond)
    hinge = F.relu(1 - real).mean(dim=1) + F.relu(1 + fake).mean(dim=1)
    torch.testing.assert_close(loss_d, (hinge.sum() + GAMMA * r1.sum()) / d.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_d["r1"], r1.sum(), rtol=1e-5, atol=1e-6)


def test_r1_reaches_only_the_heads(text_setup):
    """The critic's objective (hinge + R1 on the heads' inputs) trains the heads alone: nothing
    reaches the student, the frozen ViT, the VAE or the teacher, and the real images take no gradient."""
    loop = _loop(text_setup, add_weighting="exponential")
    m, nets = loop.method, loop.nets
    slot = m.slot(0)
    slot["x0"].requires_grad_(True)
    m.generator_loss("add", slot, 0)
    nets.G.zero_grad(set_to_none=True)
    loss, _ = m.critic_loss(slot, 0)
    loss.backward()
    assert all(p.grad is not None for p in nets.head.parameters())
    others = [*nets.G.parameters(), *nets.features.parameters(), *nets.teacher.parameters()]
    assert all(p.grad is None for p in others)
    assert slot["x0"].grad is None


@pytest.mark.parametrize("parts, width", [(["text"], "text"), (["image"], "image"), ([], "none")])
def test_conditioning_ablations(text_setup, parts, width):
    loop = _loop(text_setup, add_conditioning=parts)
    dims = {"text": loop.nets.teacher.cond_shape[1], "image": 24, "none": 0}
    assert loop.nets.head.heads[0].label_dim == dims[width]
    stats = loop.step()
    assert {"loss_d", "r1", "loss_g_adv", "loss_g_distill"} <= set(stats)
    assert (loop.method.slot(0)["cond"] is None) == (width == "none")


def test_teacher_encoder_features_with_text_conditioning(text_setup):
    from sida.nets.heads import TeacherFeatures

    loop = _loop(text_setup, features="teacher_encoder", add_conditioning=["text"])
    assert isinstance(loop.nets.features, TeacherFeatures)
    assert {"loss_d", "loss_g_adv"} <= set(loop.step())


@pytest.mark.parametrize("edit, words", [
    ({"add_features": {"kind": "teacher_encoder"}}, "add_features.kind: dinov2"),
    ({"timestep_range": None}, "distill.timestep_range"),
])
def test_bad_text_settings_are_one_line(text_setup, edit, words):
    with pytest.raises(ConfigError, match=words):
        _loop(text_setup, features=edit.get("add_features", {}).get("kind", "dinov2"),
              **{k: v for k, v in edit.items() if k != "add_features"})


def test_a_class_teacher_refuses_text_conditioning():
    from test_baselines_loop import _loop as class_loop

    with pytest.raises(ConfigError, match="add_conditioning"):
        class_loop("add", add_conditioning=["text"])


def test_sdxl_text_embedding_is_the_pooled_row_of_the_packed_condition():
    """SDXL's c_text: the pooled, projected embedding of its second encoder (the packed condition's
    last row), not a token mean; other text teachers: the token mean."""
    from sida.nets.diffusers_sdxl import pack_sdxl_condition
    from sida.train.methods.add import text_embedding, text_embedding_dim

    class SDXL(torch.nn.Module):
        pooled_dim, cond_shape = 6, (5, 10)

    class SD(torch.nn.Module):
        cond_shape = (4, 10)

    hidden, pooled = torch.randn(3, 4, 10), torch.randn(3, 6)
    torch.testing.assert_close(text_embedding(pack_sdxl_condition(hidden, pooled), SDXL()), pooled)
    torch.testing.assert_close(text_embedding(hidden, SD()), hidden.mean(dim=1))
    assert (text_embedding_dim(SDXL()), text_embedding_dim(SD())) == (6, 10)


def test_real_images_pass_the_decoder_and_dinov2_once_per_iteration(text_setup):
    loop = _loop(text_setup)
    m, f = loop.method, loop.nets.features
    seen = []
    pixels = f.pixels
    f.pixels = lambda x: (seen.append(x), pixels(x))[1]
    slot = m.slot(0)
    assert len(seen) == 1 and seen[0] is slot["x0"]  # the heads' real features and c_img: one pass
    with torch.no_grad():
        for kept, again in zip(slot["real_feats"], f(slot["x0"])):
            torch.testing.assert_close(kept, again)
    m.generator_loss("add", slot, 0)
    m.critic_loss(slot, 0)
    assert len(seen) == 4 and all(x is not slot["x0"] for x in seen[2:])  # then only the student's outputs
