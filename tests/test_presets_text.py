"""The text-to-image presets (config/sid-lsg-sd15.yaml, sid-lsg-sd21base, dmd2-sd15, sida-sd15 and the
SDXL ones: sid-lsg-sdxl, sida-sdxl, dmd2-sdxl) carry
the authors' settings, checked against tables of their launch scripts' values, and share the
zero-shot COCO evaluation of config/snippets/coco-zero-shot.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sida.run.config import load_config, run_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
SDXL_PRESETS = ("sid-lsg-sdxl", "sida-sdxl", "dmd2-sdxl")
TEXT_PRESETS = ("sid-lsg-sd15", "sid-lsg-sd21base", "dmd2-sd15", "sida-sd15", *SDXL_PRESETS)
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml/stable-diffusion-v1-5's mirror on the hub
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"

# github.com/mingyuanzhou/SiD-LSG: run -> (kappa1 = kappa2 = kappa3 = kappa4, kimg of the released
# checkpoint batch512[_sd21]_cfg<k><k><k>_t625_<kimg>_v2.pkl named in generate_onestep.py)
SID_LSG = {
    "sid-lsg-sd15": (SD15, "L61-92", {"kappa1.5": (1.5, 8806), "kappa2": (2.0, 4812), "kappa3": (3.0, 6349),
                                      "kappa4.5": (4.5, 8380)}),
    "sid-lsg-sd21base": ("stabilityai/stable-diffusion-2-1-base", "L94-123",
                         {"kappa1.5": (1.5, 9728), "kappa2": (2.0, 8482), "kappa3": (3.0, 6144),
                          "kappa4.5": (4.5, 7168)}),
}


def _load(name: str) -> dict:
    return load_config(CONFIG_DIR / f"{name}.yaml")


def _header(name: str) -> str:
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    return text[:text.index("experiment:")]


@pytest.mark.parametrize("name", sorted(SID_LSG))
def test_sid_lsg_preset_is_run_sid_sh(name):
    hub, lines, runs = SID_LSG[name]
    cfg = _load(name)
    assert cfg["teacher"] == {**cfg["teacher"], "source": "diffusers", "hub": hub, "path": None}
    assert cfg["num_procs"] * cfg["nodes"] == 4 and set(cfg["distill"]["runs"]) == set(runs)
    assert cfg["data"]["kind"] == "prompts" and (cfg["data"]["resolution"], cfg["data"]["channels"]) == (64, 4)
    assets = {a["name"]: a for a in cfg["fetch"]["assets"]}
    assert assets["aesthetics-6plus"]["path"] == cfg["data"]["prompts"] and assets["aesthetics-6plus"]["sha256"] is None
    for run, (kappa, kimg) in runs.items():
        rc = run_config(cfg, run)
        assert (rc["batch"], rc["batch_per_proc"], rc["lr_g"], rc["lr_fake"]) == (512, 1, 1e-6, 1e-6)
        assert (rc["optimizer"], rc["beta1_g"], rc["beta1_fake"], rc["beta2"], rc["adam_eps"]) == ("adam", 0, 0, 0.999, 1e-8)
        assert (rc["alpha"], rc["lambda_sid"], rc["init_timestep"], rc["timestep_range"]) == (1.0, 1.0, 625, [20, 980])
        assert (rc["precision"], rc["ema"], rc["ema_halflife_kimg"], rc["ema_rampup_ratio"]) == ("fp32", True, 50, 0.05)
        assert rc["guidance_fake_train"] == rc["guidance_fake"] == rc["guidance_teacher"] == kappa
        assert rc["empty_prompt_ratio"] == 0.1 and rc["init"] == "teacher" and not rc["discriminator"]
        assert rc["phases"] == [{"kind": "sid", "kimg": kimg}]
        assert f"_{kimg}_v2.pkl" in (CONFIG_DIR / f"{name}.yaml").read_text()
    header = " ".join(_header(name).replace("#", " ").split())
    assert "mingyuanzhou/SiD-LSG" in header and f"run_sid.sh {lines}" in header


# github.com/tianweiy/DMD2 experiments/sdv1.5: run -> (lr, GAN, iterations, init)
DMD2_SD15 = {"dmd": (1e-5, False, 39000, "teacher"), "dmd2": (5e-7, True, 2000, "dmd")}


@pytest.mark.parametrize("run", sorted(DMD2_SD15))
def test_dmd2_sd15_is_the_published_recipe(run):
    lr, gan, iters, init = DMD2_SD15[run]
    cfg = _load("dmd2-sd15")
    rc = run_config(cfg, run)
    assert (cfg["num_procs"], cfg["nodes"], cfg["seed"]) == (8, 8, 10) and cfg["teacher"]["hub"] == SD15
    assert (rc["batch"], rc["batch_per_proc"]) == (2048, 32)
    assert rc["lr_g"] == rc["lr_fake"] == lr and rc["init"] == init
    assert (rc["optimizer"], rc["beta1_g"], rc["beta1_fake"], rc["beta2"], rc["weight_decay"], rc["adam_eps"]) == \
        ("adamw", 0.9, 0.9, 0.999, 0.01, 1e-8)
    assert (rc["grad_clip"], rc["ema"], rc["critic_ratio"], rc["precision"]) == (10, False, 10, "bf16")
    assert rc["lr_warmup_kimg"] == pytest.approx(500 / 64 * 2048 / 1000)  # 500 scheduler steps / 64 processes
    assert (rc["guidance_teacher"], rc["guidance_fake"], rc["guidance_fake_train"]) == (1.75, 1.0, 1.0)
    assert (rc["init_timestep"], rc["timestep_range"]) == (999, [20, 981])
    assert rc["discriminator"] == ("dmd2_head" if gan else False)
    assert rc["phases"] == [{"kind": "dmd2" if gan else "dmd", "kimg": iters * 2048 / 1000}]
    if gan:
        assert (rc["lambda_gan"], rc["lambda_cls"]) == (1e-3, 1e-2)
        assert cfg["data"]["kind"] == "captioned_images" and cfg["data"]["image_resolution"] == 512
    assert "tianweiy/DMD2" in _header("dmd2-sd15") and "Nothing here is ours" in _header("dmd2-sd15")


def test_sida_sd15_says_its_settings_are_ours():
    text = (CONFIG_DIR / "sida-sd15.yaml").read_text()
    assert "OURS" in _header("sida-sd15") and text.count("# ours") >= 5
    cfg = _load("sida-sd15")
    assert cfg["teacher"]["hub"] == SD15 and cfg["data"]["kind"] == "captioned_images"
    sida, sid2a = run_config(cfg, "sida"), run_config(cfg, "sid2a")
    assert sida["discriminator"] is True and sid2a["init_generator"] == "sid"
    for rc in (sida, sid2a):
        assert [p["kind"] for p in rc["phases"]] == ["warmup", "sid", "sida"]
        assert (rc["batch"], rc["lr_g"], rc["init_timestep"], rc["precision"]) == (512, 1e-6, 625, "fp32")


@pytest.mark.parametrize("name", SDXL_PRESETS)
def test_sdxl_presets_shard_in_bf16_with_resources_from_the_memory_table(name):
    cfg = _load(name)
    assert cfg["teacher"]["hub"] == SDXL and cfg["teacher"]["source"] == "diffusers"
    assert (cfg["data"]["resolution"], cfg["data"]["channels"], cfg["data"]["label_dim"]) == (128, 4, 0)
    assert cfg["num_procs"] == 8 and cfg["resources"]["distill"]["mem_mb"] >= 8 * 45_000
    for run in cfg["distill"]["runs"]:
        rc = run_config(cfg, run)
        assert (rc["parallel"], rc["precision"]) == ("fsdp", "bf16")
    header = " ".join(_header(name).replace("#", " ").split())
    assert "docs/memory.md" in header and "SLURM resources" in header


def test_sid_lsg_and_sida_sdxl_say_they_are_ours_with_sid_lsg_settings():
    for name in ("sid-lsg-sdxl", "sida-sdxl"):
        assert "OURS" in _header(name) and "run_sid.sh L61-92" in " ".join(_header(name).replace("#", " ").split())
        cfg = _load(name)
        for run in cfg["distill"]["runs"]:
            rc = run_config(cfg, run)
            assert (rc["batch"], rc["batch_per_proc"], rc["lr_g"], rc["lr_fake"], rc["init_timestep"]) == (512, 1, 1e-6, 1e-6, 625)
            assert (rc["optimizer"], rc["beta1_g"], rc["beta2"], rc["alpha"], rc["empty_prompt_ratio"]) == ("adam", 0, 0.999, 1.0, 0.1)
    assert {r: run_config(_load("sid-lsg-sdxl"), r)["phases"] for r in ("kappa1.5", "kappa4.5")} == \
        {"kappa1.5": [{"kind": "sid", "kimg": 8806}], "kappa4.5": [{"kind": "sid", "kimg": 8380}]}
    sida = _load("sida-sdxl")
    assert sida["data"]["kind"] == "captioned_images" and sida["data"]["image_resolution"] == 1024
    assert run_config(sida, "sid2a")["init_generator"] == "sid" and run_config(sida, "sida")["discriminator"] is True


def test_dmd2_sdxl_is_the_published_one_step_recipe():
    """experiments/sdxl/sdxl_cond399_8node_lr5e-7_1step_..._noode.sh at tianweiy/DMD2@8d8fa55."""
    cfg = _load("dmd2-sdxl")
    rc = run_config(cfg, "dmd2")
    assert (cfg["num_procs"], cfg["nodes"], cfg["seed"]) == (8, 8, 10)
    assert (rc["batch"], rc["batch_per_proc"], rc["lr_g"], rc["lr_fake"]) == (128, 2, 5e-7, 5e-7)
    assert (rc["optimizer"], rc["beta1_g"], rc["beta2"], rc["weight_decay"], rc["grad_clip"], rc["ema"]) == \
        ("adamw", 0.9, 0.999, 0.01, 10, False)
    assert (rc["guidance_teacher"], rc["guidance_fake"], rc["critic_ratio"]) == (8, 1, 5)
    assert (rc["init_timestep"], rc["timestep_range"], rc["lambda_gan"], rc["lambda_cls"]) == (399, [20, 981], 5e-3, 1e-2)
    assert rc["lr_warmup_kimg"] == pytest.approx(500 / 64 * 128 / 1000)  # 500 scheduler steps / 64 processes
    assert rc["discriminator"] == "dmd2_head" and rc["phases"] == [{"kind": "dmd2", "kimg": 24000 * 128 / 1000}]
    header = " ".join(_header("dmd2-sdxl").replace("#", " ").split())
    assert "tianweiy/DMD2" in header and "sdxl_cond399_8node_lr5e-7_1step" in header and "OURS" in header


@pytest.mark.parametrize("name", TEXT_PRESETS)
def test_text_presets_share_the_zero_shot_coco_evaluation(name):
    """The snippet's evaluate settings and assets, whatever the preset adds (a preset that lists
    its own assets restates the snippet's: lists replace whole)."""
    snippet = yaml.safe_load((CONFIG_DIR / "snippets" / "coco-zero-shot.yaml").read_text())
    cfg = _load(name)
    for key, value in snippet["evaluate"].items():
        assert cfg["evaluate"][key] == value, key
    assets = {a["name"]: a for a in cfg["fetch"]["assets"]}
    for asset in snippet["fetch"]["assets"]:
        assert {k: assets[asset["name"]].get(k) for k in asset} == asset, asset["name"]
    check = pytest.importorskip("sida.io.assets").check_assets
    assert {a["name"] for a in check(cfg["fetch"])} == set(assets)
    assert cfg["teacher"]["source"] == "diffusers" and cfg["device"] == "cuda"
