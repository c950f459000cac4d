"""Zero-shot COCO evaluation from the config (sida.eval.zero_shot) and the fetch stage's new asset
kinds (captions, clip, images): the preset snippet validates, fetched assets are found by name,
and mistakes fail in one line."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sida.errors import AssetError, ConfigError, DataError
from sida.eval.zero_shot import (asset_path, build_clip_scorer, check_zero_shot, coco_resolution, load_prompts)
from sida.run.config import load_config, validate
from stages.fetch import fetch

REPO = Path(__file__).resolve().parents[1]
SNIPPET = REPO / "config" / "snippets" / "coco-zero-shot.yaml"


def _merged(tmp_path: Path, **evaluate) -> dict:
    """config/config.yaml with the snippet merged in (and `evaluate` overrides), validated."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    snip = yaml.safe_load(SNIPPET.read_text())
    base["evaluate"] = {**base.get("evaluate", {}), **snip["evaluate"], **evaluate}
    base["fetch"] = {"cache_dir": str(tmp_path / "cache"), "assets": copy.deepcopy(snip["fetch"]["assets"])}
    base["results_dir"] = str(tmp_path / "results")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(base))
    return load_config(tmp_path / "cfg.yaml")


def test_snippet_validates_and_defaults(tmp_path):
    cfg = _merged(tmp_path)
    ev = cfg["evaluate"]
    assert ev["coco"] == {"protocol": "coco2014-30k", "images": "coco-val2014", "resolution": 256}
    assert ev["clip"]["model"] == "ViT-g-14" and ev["clip"]["prefix"] == "A photo depicts "
    assert check_zero_shot(cfg) == [] and coco_resolution(cfg) == 256
    kinds = {a["name"]: a["kind"] for a in cfg["fetch"]["assets"]}
    assert kinds == {"coco-captions": "captions", "coco-val2014": "images", "clip-vit-g-14": "clip",
                     "inception": "inception"}
    # defaults: off, and every key documented
    plain = load_config(REPO / "config" / "config.yaml")["evaluate"]
    assert plain["prompts"] is None and plain["coco"] is None and plain["clip"] is None
    cfg2 = _merged(tmp_path, coco={"images": "x"}, clip={"weights": "w.bin"})
    assert cfg2["evaluate"]["coco"]["protocol"] == "coco2014-30k" and cfg2["evaluate"]["coco"]["resolution"] is None
    assert coco_resolution(cfg2) == 256 and cfg2["evaluate"]["clip"]["model"] == "ViT-g-14"


@pytest.mark.parametrize("evaluate,match", [
    ({"coco": {"protocol": "coco2014-30k"}}, "images"),
    ({"coco": {"images": "x", "protocol": "coco9"}}, "coco9"),
    ({"clip": {"model": "ViT-g-14"}}, "weights"),
    ({"clip": {"weights": "w", "colour": 1}}, "colour"),
])
def test_bad_settings_rejected_by_schema(tmp_path, evaluate, match):
    cfg = _merged(tmp_path)
    cfg["evaluate"].update(evaluate)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_inconsistent_settings_one_line(tmp_path):
    with pytest.raises(ConfigError, match="needs evaluate.prompts"):
        check_zero_shot(_merged(tmp_path, prompts=None))
    with pytest.raises(ConfigError, match="inception_mode: clean"):
        check_zero_shot(_merged(tmp_path, inception_mode="legacy_tensorflow"))
    notes = check_zero_shot(_merged(tmp_path, num_samples=1000))
    assert len(notes) == 1 and "1000 samples per run" in notes[0] and "30000" in notes[0]


def test_fetch_new_kinds_and_find_them_by_name(tmp_path):
    (tmp_path / "caps.txt").write_text("a dog\n\na cat\n")
    (tmp_path / "clip.bin").write_bytes(b"weights")
    imgs = tmp_path / "val2014"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((6, 9, 3), 30 * i, np.uint8)).save(imgs / f"{i}.jpg")
    cfg = _merged(tmp_path)
    cfg["fetch"]["assets"] = [
        {"name": "coco-captions", "kind": "captions", "path": str(tmp_path / "caps.txt")},
        {"name": "clip-vit-g-14", "kind": "clip", "path": str(tmp_path / "clip.bin")},
        {"name": "coco-val2014", "kind": "images", "path": str(imgs)}]
    cfg = validate(cfg)
    with pytest.raises(AssetError, match="asset 'coco-captions' has not been fetched .* run the fetch stage"):
        load_prompts(cfg)
    out = Path(cfg["results_dir"]) / cfg["experiment"] / "fetch"
    manifest = fetch(cfg, out)
    entries = {e["name"]: e for e in manifest["assets"]}
    assert entries["coco-captions"]["output"] == "coco-captions.txt" and entries["coco-captions"]["captions"] == 2
    assert entries["clip-vit-g-14"]["output"] == "clip-vit-g-14.bin"
    assert entries["coco-val2014"]["output"] is None and entries["coco-val2014"]["images"] == 3
    assert load_prompts(cfg) == ["a dog", "a cat"]
    assert asset_path(cfg, "coco-val2014", "images", "evaluate.coco.images") == imgs.resolve()
    assert asset_path(cfg, "clip-vit-g-14", "clip", "k") == out / "clip-vit-g-14.bin"
    assert asset_path(cfg, str(tmp_path / "x.txt"), "captions", "k") == tmp_path / "x.txt"  # not a name: a path
    with pytest.raises(ConfigError, match="evaluate.prompts: fetch asset 'coco-val2014' is of kind images, not captions"):
        asset_path(cfg, "coco-val2014", "captions", "evaluate.prompts")
    # the fetched weights are found, and rejected in one line (these bytes are no CLIP model)
    with pytest.raises(AssetError, match="clip-vit-g-14.bin cannot be loaded into ViT-g-14 \\(not a torch.save zip") as exc:
        build_clip_scorer(cfg)
    assert "\n" not in str(exc.value)


def test_fetch_rejects_bad_assets_one_line(tmp_path):
    (tmp_path / "caps.json").write_text("[1, 2]")
    cfg = _merged(tmp_path)
    cfg["fetch"]["assets"] = [{"name": "coco-captions", "kind": "captions", "path": str(tmp_path / "caps.json")}]
    with pytest.raises(DataError, match="not COCO captions annotations"):
        fetch(validate(cfg), tmp_path / "out")
    cfg["fetch"]["assets"] = [{"name": "imgs", "kind": "images", "path": str(tmp_path)}]
    with pytest.raises(AssetError, match="hold no images"):
        fetch(validate(cfg), tmp_path / "out")
    cfg["fetch"]["assets"] = [{"name": "manifest", "kind": "captions", "path": str(tmp_path / "caps.json")}]
    with pytest.raises(ConfigError, match="cannot be called 'manifest'"):
        fetch(validate(cfg), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
