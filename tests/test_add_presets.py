"""The ADD text presets (config/add-m-sd21.yaml, add-m-sd21-coco30k, add-xl-sdxl on base/add-sd.yaml)
carry what ADD's paper (arXiv 2311.17042) states, say what is ours, and evaluate with the paper's
COCO-2017 5k protocol, or (coco30k) the other SD presets' COCO-2014 30k protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sida.run.config import load_config, run_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
ADD_PRESETS = ("add-m-sd21", "add-m-sd21-coco30k", "add-xl-sdxl")


def _load(name: str) -> dict:
    return load_config(CONFIG_DIR / f"{name}.yaml")


def _header(path: Path) -> str:
    text = path.read_text()
    end = text.index("experiment:") if "experiment:" in text else text.index("extends:")
    return " ".join(text[:end].replace("#", " ").split())


@pytest.mark.parametrize("name", ADD_PRESETS)
def test_add_presets_carry_the_papers_method(name):
    rc = run_config(_load(name), "add")
    paper = {"lambda_distill": 2.5, "r1_gamma": 1.0e-5, "add_weighting": "alpha_bar",
             "add_student_steps": [999, 749, 499, 249], "add_conditioning": ["text", "image"],
             "discriminator": "add", "eval_steps": [1, 4], "init": "teacher"}
    assert {k: rc[k] for k in paper} == paper
    assert (rc["add_features"]["kind"], rc["add_features"]["arch"]) == ("dinov2", "vits14")
    assert rc["timestep_range"] == [0, 1000] and [p["kind"] for p in rc["phases"]] == ["add"]
    for path in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / "base" / "add-sd.yaml"):
        header = _header(path)
        assert "ADD" in header and "OURS" in header, path.name
    assert "arXiv 2311.17042" in _header(CONFIG_DIR / "base" / "add-sd.yaml")


@pytest.mark.parametrize("name, protocol, samples", [("add-m-sd21", "coco2017-5k", 5000),
                                                     ("add-xl-sdxl", "coco2017-5k", 5000),
                                                     ("add-m-sd21-coco30k", "coco2014-30k", 30000)])
def test_add_presets_evaluate_zero_shot_coco_with_clip_vit_g(name, protocol, samples):
    cfg = _load(name)
    ev = cfg["evaluate"]
    assert (ev["coco"]["protocol"], ev["num_samples"]) == (protocol, samples)
    assert ev["clip"]["model"] == "ViT-g-14" and ev["prompts"] == "coco-captions"
    check = pytest.importorskip("sida.io.assets").check_assets
    names = {a["name"] for a in check(cfg["fetch"])}
    assert {ev["coco"]["images"], "coco-captions", "clip-vit-g-14", "dinov2_vits14"} <= names


def test_the_30k_variant_is_the_snippets_evaluation_and_add_ms_training():
    snippet = yaml.safe_load((CONFIG_DIR / "snippets" / "coco-zero-shot.yaml").read_text())
    cfg, base = _load("add-m-sd21-coco30k"), _load("add-m-sd21")
    for key, value in snippet["evaluate"].items():
        assert cfg["evaluate"][key] == value, key
    assets = {a["name"]: a for a in cfg["fetch"]["assets"]}
    for asset in snippet["fetch"]["assets"]:
        assert {k: assets[asset["name"]].get(k) for k in asset} == asset, asset["name"]
    assert cfg["distill"] == base["distill"] and cfg["teacher"] == base["teacher"]


def test_add_teachers():
    assert _load("add-m-sd21")["teacher"]["hub"] == "stabilityai/stable-diffusion-2-1-base"
    xl = _load("add-xl-sdxl")
    assert xl["teacher"]["hub"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (xl["data"]["resolution"], xl["data"]["image_resolution"], xl["num_procs"]) == (128, 1024, 8)
    rc = run_config(xl, "add")
    assert (rc["parallel"], rc["precision"]) == ("fsdp", "bf16")
    assert xl["resources"]["distill"]["mem_mb"] >= 8 * 45_000
