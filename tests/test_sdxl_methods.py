"""Every method on an SDXL teacher (issue 35 item 2): SiD-LSG, SiDA, SiD2A (SiDA from a SiD
generator), DMD2 with its head and ADD with its text-projected heads run through `DistillLoop` on a
tiny random StableDiffusionXLPipeline (both text encoders packed into the condition, time ids,
its VAE's latents of captioned digits; nothing downloaded). Each run's losses are finite, its
generator moves, and its critic trains. About 1 min on the loaded 2-core machine."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO  # noqa: E402
from sd_assets import save_captioned_digits, save_tiny_sdxl_pipeline  # noqa: E402

ITERS = 3  # of 4 images each
RUNS = {
    "sid": {"guidance_fake_train": 1.5, "guidance_fake": 1.5, "guidance_teacher": 1.5,
            "phases": [{"kind": "warmup", "kimg": 0.004}, {"kind": "sid", "kimg": 0.008}]},
    "sida": {"discriminator": "sida", "phases": [{"kind": "warmup", "kimg": 0.004}, {"kind": "sid", "kimg": 0.004},
                                                 {"kind": "sida", "kimg": 0.004}]},
    "dmd2": {"discriminator": "dmd2_head", "init_timestep": 399, "guidance_teacher": 8.0, "critic_ratio": 2,
             "timestep_range": [20, 980], "phases": [{"kind": "dmd2", "kimg": 0.012}]},
    "add": {"discriminator": "add", "add_features": {"kind": "teacher_encoder"}, "add_conditioning": ["text"],
            "add_weighting": "alpha_bar", "timestep_range": [0, 1000], "eval_steps": [1, 4],
            "phases": [{"kind": "add", "kimg": 0.012}]},
}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from sida.io.diffusers_teacher import load_teacher
    from sida.io.text_run import open_run_text_dataset

    d = tmp_path_factory.mktemp("sdxl-methods")
    folder = save_tiny_sdxl_pipeline(d / "teacher")
    save_captioned_digits(d / "digits", count=16)
    cfg = yaml.safe_load((REPO / "config" / "ci-sd.yaml").read_text())
    cfg.update(results_dir=str(d / "results"), export={"runs": []})
    cfg["data"]["path"], cfg["teacher"]["path"] = str(d / "digits"), str(folder)
    cfg["data"]["image_resolution"] = 16  # the tiny SDXL VAE: 16x16 images <-> 4x8x8 latents
    cfg["distill"]["batch"] = 4
    teacher = load_teacher(folder)
    assert teacher.pooled_dim  # an SDXL teacher: the packed condition carries the pooled row
    dataset = open_run_text_dataset(cfg["data"], teacher, "cpu", d / "cache")
    return {"cfg": cfg, "folder": folder, "dataset": dataset}


def _train(sdxl: dict, run: str, init_generator: torch.nn.Module | None = None):
    """ITERS iterations of `run` on the tiny SDXL teacher; the loop and the teacher's weights."""
    from sida.io.diffusers_teacher import load_teacher
    from sida.run import dist
    from sida.run.config import run_config, validate
    from sida.train.loop import DistillLoop
    from sida.train.nets import init_nets

    cfg = copy.deepcopy(sdxl["cfg"])
    cfg["distill"]["runs"] = {run: {"init": "teacher", **RUNS["sida" if run == "sid2a" else run]}}
    rc = run_config(validate(cfg), run)
    teacher = load_teacher(sdxl["folder"]).requires_grad_(False)
    start = {k: v.clone() for k, v in (init_generator or teacher).state_dict().items()}
    loop = DistillLoop(rc, init_nets(teacher, rc["dropout"], init_generator=init_generator), sdxl["dataset"],
                       dist.init("cpu", 0), seed=0)
    critic_start = [p.detach().clone() for p in loop.critic_params]
    kinds, stats = [], []
    for _ in range(ITERS):
        kinds.append(loop.phase_name())
        stats.append({k: float(v) for k, v in loop.step().items()})
        loop.nimg += loop.batch
    return loop, start, critic_start, kinds, stats


def _moved(net: torch.nn.Module, start: dict) -> bool:
    return any(not torch.equal(v, start[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("run", ["sid", "sida", "sid2a", "dmd2", "add"])
def test_every_method_trains_on_an_sdxl_teacher(sdxl, run):
    init_generator = None
    if run == "sid2a":  # SiDA from a SiD generator: G starts from the sid run's EMA generator
        init_generator = _train(sdxl, "sid")[0].nets.G_ema
    loop, start, critic_start, kinds, stats = _train(sdxl, run, init_generator)
    expected = {"sid": ["warmup", "sid", "sid"], "sida": ["warmup", "sid", "sida"], "sid2a": ["warmup", "sid", "sida"],
                "dmd2": ["dmd2"] * 3, "add": ["add"] * 3}[run]
    assert kinds == expected
    assert all(torch.isfinite(torch.tensor(v)) for s in stats for v in s.values()), stats
    losses = {k for s in stats for k in s if k.startswith("loss")}
    assert any(k.startswith("loss_g") for k in losses), losses  # a generator update happened
    assert _moved(loop.nets.G, start), "the generator did not move"
    assert any(not torch.equal(p, q) for p, q in zip(loop.critic_params, critic_start)), "the critic did not train"
    if run in ("dmd2", "add"):
        assert loop.nets.head is not None  # DMD2's head, ADD's heads projected on SDXL's pooled text embedding
    if run == "add":
        cond = loop.method.slot(0)["cond"]
        assert cond.shape == (4, loop.nets.teacher.pooled_dim)
