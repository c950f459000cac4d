"""Zero-shot COCO protocol (sida.eval.coco): captions files, seed -> caption, the centre crop
and Lanczos resize, and reference statistics from a folder or zip, checked by hand."""

from __future__ import annotations

import collections
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sida.errors import AssetError, ConfigError, DataError
from sida.eval.coco import (PROTOCOLS, center_crop_box, get_protocol, list_reference_images, prepare_image,
                            prepare_images, prompts_for_seeds, read_captions, reference_stats)
from sida.io.images import quantize
from zero_shot_assets import PoolExtractor


def test_captions_txt_pkl_json(tmp_path):
    (tmp_path / "c.txt").write_text(" A dog on a bench. \n\nTwo cats \n  \na bus\n", encoding="utf-8")
    assert read_captions(tmp_path / "c.txt") == ["A dog on a bench.", "Two cats", "a bus"]
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(["A dog", "Two cats"]))
    assert read_captions(tmp_path / "c.pkl") == ["A dog", "Two cats"]
    ann = {"images": [{"id": 9}, {"id": 3}],
           "annotations": [{"image_id": 9, "id": 50, "caption": "nine, later"},
                           {"image_id": 3, "id": 7, "caption": " three, first "},
                           {"image_id": 9, "id": 41, "caption": "nine, first"},
                           {"image_id": 3, "id": 8, "caption": "three, later"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    # one caption per image (its lowest annotation id), images by ascending id
    assert read_captions(tmp_path / "captions_val2017.json") == ["three, first", "nine, first"]


def test_seed_to_caption():
    caps = [f"c{i}" for i in range(30_000)]
    assert prompts_for_seeds(caps, range(29_998, 30_002)) == ["c29998", "c29999", "c0", "c1"]
    assert prompts_for_seeds(caps, range(30_000)) == caps  # a 30k run from seed 0: every caption once, in order


@pytest.mark.parametrize("content,name,error,match", [
    (None, "missing.txt", AssetError, "does not exist: run the fetch stage \\(an asset of kind captions named 'caps'"),
    (b"a\nb\n", "c.csv", DataError, "unknown format '.csv'"),
    (b"\xff\xfe\xfa bad", "c.txt", DataError, "cannot be read as .txt"),
    (b"\n  \n", "c.txt", DataError, "holds no captions"),
    (pickle.dumps(collections.OrderedDict(a=1)), "c.pkl", DataError, "references collections.OrderedDict"),
    (pickle.dumps({"a": 1}), "c.pkl", DataError, "does not hold a list of strings"),
    (b"{\"images\": []}", "c.json", DataError, "not COCO captions annotations"),
    (b"{not json", "c.json", DataError, "cannot be read as .json"),
])
def test_bad_captions_one_line(tmp_path, content, name, error, match):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=match) as exc:
        read_captions(tmp_path / name, asset="caps")
    assert "\n" not in str(exc.value)


def test_protocols():
    assert get_protocol("coco2014-30k").resolution == 256 and PROTOCOLS["coco2014-30k"].num_samples == 30_000
    with pytest.raises(ConfigError, match="unknown protocol 'coco'.*coco2014-30k, coco2017-5k"):
        get_protocol("coco")


def test_centre_crop_rounds_as_torchvision():
    # by hand: (W - S) / 2 rounded half to even
    assert center_crop_box(5, 3) == (1, 0, 4, 3)
    assert center_crop_box(6, 3) == (2, 0, 5, 3)      # 1.5 -> 2
    assert center_crop_box(3, 4) == (0, 0, 3, 3)      # 0.5 -> 0
    assert center_crop_box(4, 7) == (0, 2, 4, 6)      # 1.5 -> 2
    import torchvision.transforms.functional as TF

    for w, h in [(640, 480), (427, 640), (9, 4), (5, 8)]:
        img = Image.fromarray(np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3))
        want = np.asarray(TF.center_crop(img, min(w, h)))
        assert np.array_equal(np.asarray(img.crop(center_crop_box(w, h))), want)


def test_prepare_image_by_hand():
    # 12 x 8 (W x H): the centre 8 x 8 square survives untouched at resolution 8, the margins go
    centre = (np.arange(8 * 8 * 3) % 253).astype(np.uint8).reshape(8, 8, 3)
    arr = np.zeros((8, 12, 3), np.uint8)
    arr[:, :2] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    arr[:, 2:10] = centre
    assert np.array_equal(prepare_image(Image.fromarray(arr), 8), centre)
    # a constant image keeps its colour through crop and Lanczos resize; grayscale becomes RGB
    const = Image.fromarray(np.full((20, 30, 3), (17, 200, 99), np.uint8))
    assert np.array_equal(prepare_image(const, 7), np.full((7, 7, 3), (17, 200, 99), np.uint8))
    assert prepare_image(Image.fromarray(np.full((5, 5), 9, np.uint8)), 5).shape == (5, 5, 3)
    # the filter is Lanczos (bicubic gives other pixels on a pattern)
    pat = Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    assert np.array_equal(prepare_image(pat, 12), np.asarray(pat.resize((12, 12), Image.LANCZOS)))
    assert not np.array_equal(prepare_image(pat, 12), np.asarray(pat.resize((12, 12), Image.BICUBIC)))


def test_prepare_generated_images():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = prepare_images(x, 8)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 8, 8)
    assert torch.equal(out, prepare_images(quantize(x), 8))
    one = Image.fromarray(quantize(x)[1].permute(1, 2, 0).numpy())
    assert np.array_equal(out[1].permute(1, 2, 0).numpy(), prepare_image(one, 8))


def _write_images(folder, n: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        h, w = rng.integers(6, 14, size=2)
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(sub / f"COCO_val2014_{i:012d}.png")
        arrays.append(arr)
    (folder / "a" / "README.txt").write_text("not an image")
    return arrays


def test_reference_stats_by_hand_cached_and_from_zip(tmp_path):
    arrays = _write_images(tmp_path / "val2014")
    x = PoolExtractor()
    ref = reference_stats(tmp_path / "val2014", x, 4, tmp_path / "cache", batch=3, workers=2)
    feats = np.stack([np.asarray(prepare_image(Image.fromarray(a), 4), np.float64).transpose(2, 0, 1)
                      .reshape(3, 2, 2, 2, 2).mean((2, 4)).reshape(-1) for a in arrays])
    assert ref.num_images == 7 and ref.resolution == 4 and ref.source == "coco"
    assert np.allclose(ref.mu, feats.mean(0)) and np.allclose(ref.sigma, np.cov(feats, rowvar=False))
    calls = x.calls
    assert calls == 3  # 7 images in batches of 3
    again = reference_stats(tmp_path / "val2014", x, 4, tmp_path / "cache", batch=3)
    assert x.calls == calls and again.sha256 == ref.sha256  # from the cache
    assert [p.name.startswith("refstats-coco-") for p in (tmp_path / "cache").iterdir()] == [True]
    with zipfile.ZipFile(tmp_path / "val2014.zip", "w") as z:
        for p in sorted((tmp_path / "val2014").rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(tmp_path / "val2014").as_posix())
    zref = reference_stats(tmp_path / "val2014.zip", PoolExtractor(), 4, tmp_path / "cache2")
    assert np.allclose(zref.mu, ref.mu) and np.allclose(zref.sigma, ref.sigma)
    assert len(list_reference_images(tmp_path / "val2014.zip")) == 7


def test_reference_errors_one_line(tmp_path):
    with pytest.raises(AssetError, match="do not exist: run the fetch stage"):
        reference_stats(tmp_path / "nope", PoolExtractor(), 4, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="hold no images"):
        list_reference_images(tmp_path / "empty")
    (tmp_path / "empty" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="reference image bad.jpg in .* cannot be read") as exc:
        reference_stats(tmp_path / "empty", PoolExtractor(), 4, tmp_path / "cache")
    assert "\n" not in str(exc.value) and not (tmp_path / "cache").exists()
    legacy = PoolExtractor()
    legacy.mode = "legacy_tensorflow"
    with pytest.raises(ConfigError, match="evaluate.inception_mode: clean"):
        reference_stats(tmp_path / "empty", legacy, 4, tmp_path / "cache")
