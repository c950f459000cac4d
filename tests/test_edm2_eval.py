"""FD-DINOv2's extractor (preprocessing, the original's position-embedding interpolation, weights
from the original checkpoint layout) and EDM2's img512.pkl read without executing code."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sida.errors import DataError
from sida.eval.features import DINOv2Extractor, dinov2_preprocess, save_random_dinov2
from sida.eval.refstats import load_stats_pickle
from sida.nets.vit import DINOV2_ARCHS, build_dinov2, dinov2_pos_embed_at
from tests.edm2_assets import make_img512_refs


def test_dinov2_preprocess_by_hand():
    # A constant image stays constant through the resize; then /255 and ImageNet normalisation.
    img = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    x = dinov2_preprocess(img)
    assert x.shape == (1, 3, 224, 224)
    want = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 100, 100], want, rtol=1e-5, atol=1e-5)
    # Bicubic with antialiasing (a downscale from 512 differs from the non-antialiased one).
    img = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(img.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    ref = (ref - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(dinov2_preprocess(img), ref)
    plain = F.interpolate(img.float(), size=(224, 224), mode="bicubic", antialias=False) / 255
    assert (ref - plain).abs().max() > 0.01


def test_pos_embed_interpolation_is_the_originals():
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 37 * 37, 8, generator=g)
    out = dinov2_pos_embed_at(pe, 16)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, 0], pe[:, 0])
    # The original: bicubic, scale factor (16 + 0.1) / 37, no antialiasing, on the [1, D, 37, 37] grid.
    grid = pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    torch.testing.assert_close(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, 8))
    # ... which is not the size-based resize (sampling positions differ).
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert (out[:, 1:] - by_size).abs().max() > 1e-3


def test_dinov2_from_original_checkpoint(tmp_path):
    path = save_random_dinov2(tmp_path / "dinov2_vits14_pretrain.pth", "vits14", seed=1)
    sd = torch.load(path, weights_only=True)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384) and "mask_token" in sd
    ext = DINOv2Extractor("vits14", path)
    assert ext.feature_dim == DINOV2_ARCHS["vits14"][1] == 384 and ext.metric_key == "fd_dinov2"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    feats, probs = ext(images)
    assert feats.shape == (2, 384) and probs is None
    # The features are the final-norm class token of the ViT run on the preprocessed images.
    m = ext.model
    x = m.patch_embed(dinov2_preprocess(images))
    x = torch.cat([m.cls_token.expand(2, -1, -1), x], 1) + dinov2_pos_embed_at(sd["pos_embed"], 16)
    for blk in m.blocks:
        x = blk(x)
    torch.testing.assert_close(feats, m.norm(x)[:, 0], rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="do not exist"):
        build_dinov2("vitl14", tmp_path / "missing.pth")


def test_read_img512_pickle(tmp_path):
    path = make_img512_refs(tmp_path / "img512.pkl", fid_dim=6, dino_dim=4, seed=3)
    stats = load_stats_pickle(path)
    assert set(stats) == {"fid", "fd_dinov2"}
    raw = pickle.loads(path.read_bytes())  # our own file: safe to compare against
    for k in stats:
        np.testing.assert_array_equal(stats[k][0], raw[k]["mu"])
        np.testing.assert_array_equal(stats[k][1], raw[k]["sigma"])
    assert stats["fid"][1].shape == (6, 6) and stats["fd_dinov2"][0].shape == (4,)


class _Evil:
    def __reduce__(self):
        return os.system, ("touch /tmp/sida-should-not-exist",)


def test_img512_pickle_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(2), "sigma": np.eye(2), "x": _Evil()}}))
    with pytest.raises(DataError) as info:
        load_stats_pickle(path)
    assert "refusing to read" in str(info.value) and "system" in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists("/tmp/sida-should-not-exist")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.eye(2)}}))
    with pytest.raises(DataError, match="sigma"):
        load_stats_pickle(bad)
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(make_img512_refs(tmp_path / "ok.pkl", 4, 4).read_bytes()[:50])
    with pytest.raises(DataError, match="cannot be read"):
        load_stats_pickle(trunc)
