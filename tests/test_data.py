"""Datasets: digits, EDM dataset_tool zips, folders; shapes, ranges, labels, xflip, errors."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sida.io.data import open_dataset
from sida.errors import DataError


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, res: int, ch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, res, res, ch), dtype=np.uint8)


def write_edm_zip(path: Path, imgs: np.ndarray, labels: list[int] | None) -> Path:
    """A zip in EDM dataset_tool's layout (00000/img00000000.png + dataset.json)."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(imgs))]
    with zipfile.ZipFile(path, "w") as zf:
        for name, img in zip(names, imgs):
            zf.writestr(name, _png(img))
        meta = {"labels": None if labels is None else [[n, int(l)] for n, l in zip(names, labels)]}
        zf.writestr("dataset.json", json.dumps(meta))
    return path


def test_digits_shapes_range_labels():
    ds = open_dataset({"kind": "digits", "resolution": 8, "channels": 1, "label_dim": 10})
    assert len(ds) == 1797 and (ds.resolution, ds.channels, ds.label_dim) == (8, 1, 10)
    x, y = ds.get_batch(torch.arange(5))
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert y.shape == (5, 10) and torch.equal(y.sum(1), torch.ones(5))
    from sklearn.datasets import load_digits
    d = load_digits()
    assert torch.allclose(x[:, 0], torch.as_tensor(d.images[:5], dtype=torch.float32) / 8 - 1)
    assert y.argmax(1).tolist() == d.target[:5].tolist()
    u = ds.uint8_images(torch.arange(3))
    assert u.shape == (3, 8, 8, 1) and u.dtype == np.uint8


def test_digits_unconditional_xflip_upscale():
    ds = open_dataset({"kind": "digits", "resolution": 16, "channels": 3, "label_dim": 0, "xflip": True})
    assert len(ds) == 2 * 1797
    x, y = ds.get_batch(torch.tensor([0, 1797]))
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 0)
    assert torch.equal(x[1], x[0].flip(2))
    u = ds.uint8_images(torch.tensor([0, 1797]))
    assert np.array_equal(u[1], u[0][:, ::-1])
    with pytest.raises(DataError, match="multiple of 8"):
        open_dataset({"kind": "digits", "resolution": 12, "channels": 1})
    with pytest.raises(DataError, match="out of range"):
        ds.get_batch(torch.tensor([len(ds)]))


def test_edm_zip_labels_and_values(tmp_path):
    imgs = _images(6, 8, 3)
    path = write_edm_zip(tmp_path / "ds.zip", imgs, [0, 1, 2, 3, 4, 4])
    ds = open_dataset({"kind": "edm_zip", "path": str(path), "resolution": 8, "channels": 3, "label_dim": 5})
    assert len(ds) == 6
    x, y = ds.get_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 8, 8)
    expect = torch.as_tensor(imgs[[0, 5]]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(x, expect)
    assert y.argmax(1).tolist() == [0, 4]
    assert np.array_equal(ds.uint8_images([2]), imgs[[2]])
    # Conditional dataset used unconditionally: fine.
    ds0 = open_dataset({"kind": "edm_zip", "path": str(path), "resolution": 8, "channels": 3, "label_dim": 0,
                        "xflip": True})
    x0, y0 = ds0.get_batch(torch.tensor([1, 7]))
    assert y0.shape == (2, 0) and torch.equal(x0[1], x0[0].flip(2))
    # Survives pickling (DataLoader workers): the zip handle is reopened in the new object.
    ds1 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds1.get_batch(torch.tensor([3]))[0], ds.get_batch(torch.tensor([3]))[0])


def test_edm_zip_errors(tmp_path):
    path = write_edm_zip(tmp_path / "ds.zip", _images(3, 16, 3), None)
    with pytest.raises(DataError) as info:
        open_dataset({"kind": "edm_zip", "path": str(path), "resolution": 8, "channels": 3, "label_dim": 0})
    msg = str(info.value)
    assert "has 16x16x3 images" in msg and "expects 8x8x3" in msg and "data.resolution" in msg
    with pytest.raises(DataError, match="has no labels"):  # unlabelled data, conditional config
        open_dataset({"kind": "edm_zip", "path": str(path), "resolution": 16, "channels": 3, "label_dim": 10})
    lab = write_edm_zip(tmp_path / "lab.zip", _images(3, 8, 1), [0, 1, 9])
    with pytest.raises(DataError, match="labels up to 9"):
        open_dataset({"kind": "edm_zip", "path": str(lab), "resolution": 8, "channels": 1, "label_dim": 5})
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        open_dataset({"kind": "edm_zip", "path": str(bad), "resolution": 8, "channels": 3})
    with pytest.raises(DataError, match="does not exist"):
        open_dataset({"kind": "edm_zip", "path": str(tmp_path / "nope.zip"), "resolution": 8, "channels": 3})
    # A corrupt image inside a valid zip fails at read time with a one-line DataError.
    corrupt = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(corrupt, "w") as zf:
        zf.writestr("00000/img00000000.png", _png(_images(1, 8, 3)[0]))
        zf.writestr("00000/img00000001.png", b"\x89PNG garbage")
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    ds = open_dataset({"kind": "edm_zip", "path": str(corrupt), "resolution": 8, "channels": 3})
    with pytest.raises(DataError, match="cannot be decoded"):
        ds.get_batch(torch.tensor([1]))


def test_folder_dataset(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    imgs = _images(4, 8, 1, seed=3)
    names = ["a.png", "b.png", "sub/c.png", "sub/d.png"]
    for n, img in zip(names, imgs):
        (root / n).write_bytes(_png(img))
    (root / "dataset.json").write_text(json.dumps({"labels": [[n, i % 2] for i, n in enumerate(names)]}))
    ds = open_dataset({"kind": "folder", "path": str(root), "resolution": 8, "channels": 1, "label_dim": 2})
    x, y = ds.get_batch(torch.arange(4))
    assert x.shape == (4, 1, 8, 8) and y.argmax(1).tolist() == [0, 1, 0, 1]
    assert np.array_equal(ds.uint8_images(torch.arange(4)), imgs)
    with pytest.raises(DataError, match="expects 8x8x3"):
        open_dataset({"kind": "folder", "path": str(root), "resolution": 8, "channels": 3})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no images"):
        open_dataset({"kind": "folder", "path": str(tmp_path / "empty"), "resolution": 8, "channels": 1})
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        open_dataset({"kind": "folder", "path": str(root), "resolution": 8, "channels": 1, "label_dim": 2})


def test_unknown_kind_and_missing_path():
    with pytest.raises(DataError, match="unknown data.kind"):
        open_dataset({"kind": "lmdb"})
    with pytest.raises(DataError, match="needs data.path"):
        open_dataset({"kind": "folder", "resolution": 8, "channels": 1})
