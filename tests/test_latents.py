"""The latent codec (EDM2's constants, [0,1] pixels, clamp, x255, truncation), the local-only VAE,
and the encoded-zip reader (mean + N(0,1) std, then scaled; streamed item by item)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from sida.errors import AssetError, ConfigError, DataError
from sida.io.data import EncodedLatentDataset, open_dataset
from sida.io.images import quantize
from sida.io.latents import (LatentCodec, LatentDecoder, load_vae, pixels_to_vae, uint8_to_unit, vae_to_uint8)
from tests.edm2_assets import make_encoded_zip, make_tiny_vae_folder


def test_codec_constants_by_hand():
    c = LatentCodec()
    raw_mean = np.array([5.81, 3.25, 0.12, -2.15])
    raw_std = np.array([4.17, 4.62, 3.71, 3.28])
    np.testing.assert_allclose(c.scale, 0.5 / raw_std, rtol=1e-6)
    np.testing.assert_allclose(c.bias, -raw_mean * 0.5 / raw_std, rtol=1e-6)
    assert c.scale.dtype == np.float32 and c.bias.dtype == np.float32
    # Channel 0: a raw latent at the assumed mean maps to 0, one std above to 0.5.
    raw = torch.tensor([5.81, 3.25 + 4.62, 0.12, -2.15 - 3.28]).reshape(1, 4, 1, 1)
    final = raw * torch.as_tensor(c.scale).reshape(1, 4, 1, 1) + torch.as_tensor(c.bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(final.flatten(), torch.tensor([0.0, 0.5, 0.0, -0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(c.to_raw(final), raw, atol=1e-5, rtol=0)
    c.check_against(c.scale, c.bias, "snapshot")
    with pytest.raises(ConfigError, match="scale"):
        c.check_against(c.scale * 2, c.bias, "snapshot")


def test_sample_final_is_mean_plus_noise_times_std_then_scaled():
    c = LatentCodec()
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 3, 3, generator=g) * 3
    std = torch.rand(2, 4, 3, 3, generator=g) + 0.1
    out = c.sample_final(torch.cat([mean, std], 1), torch.Generator().manual_seed(7))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    s = torch.as_tensor(c.scale).reshape(1, 4, 1, 1)
    b = torch.as_tensor(c.bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(out, (mean + noise * std) * s + b)
    # Many draws: mean and std of the final latent follow the posterior's.
    ms = torch.cat([mean[:1], std[:1]], 1).expand(4000, -1, -1, -1)
    draws = c.sample_final(ms, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), (mean[0] * s[0] + b[0]), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), std[0] * s[0], atol=0.02, rtol=0.05)


def test_pixel_range_clamp_and_truncation():
    assert torch.equal(pixels_to_vae(torch.tensor([0, 51, 255], dtype=torch.uint8)), torch.tensor([0.0, 0.2, 1.0]))
    dec = torch.tensor([-0.5, 0.0, 0.999, 1.0, 1.7, 0.5, 0.0039])
    # clamp to [0,1], x255, truncate: 0.5 -> 127 (not rounded to 128), 0.999 -> 254, 0.0039 -> 0.
    assert vae_to_uint8(dec).tolist() == [0, 0, 254, 255, 255, 127, 0]
    # Decoded uint8 survive the [-1, 1] convention of the evaluation code unchanged.
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize(uint8_to_unit(u)), u)


def test_vae_local_folder_only(tmp_path):
    with pytest.raises(AssetError) as info:
        load_vae(tmp_path / "nowhere")
    msg = str(info.value)
    assert "config.json" in msg and "fetch stage" in msg and "stabilityai/sd-vae-ft-mse" in msg and "\n" not in msg
    folder = make_tiny_vae_folder(tmp_path / "vae")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(AssetError, match="cannot be loaded"):
        load_vae(folder)


def test_latent_decoder_round_trip(tmp_path):
    vae = load_vae(make_tiny_vae_folder(tmp_path / "vae"))
    dec = LatentDecoder(vae, LatentCodec(), batch=3)
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    img = dec(z)
    assert img.dtype == torch.uint8 and img.shape == (5, 3, 16, 16)
    # Batching does not change the result; the VAE decodes raw latents (scaling inverted).
    with torch.no_grad():
        want = vae_to_uint8(vae.decode(LatentCodec().to_raw(z)).sample)
    assert torch.equal(img, want)
    posterior = dec.encode(img)
    assert posterior.shape == (5, 8, 8, 8) and bool((posterior[:, 4:] > 0).all())


def test_encoded_zip_reader(tmp_path, monkeypatch):
    path = make_encoded_zip(tmp_path / "enc.zip", n=6, resolution=4, label_dim=10, seed=3)
    ds = open_dataset({"kind": "edm2_latents", "path": str(path), "resolution": 4, "channels": 4, "label_dim": 10})
    assert isinstance(ds, EncodedLatentDataset) and len(ds) == 6
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("dataset.json"))
        stored = {name: np.load(io.BytesIO(zf.read(name))) for name in zf.namelist() if name.endswith(".npy")}
    names = sorted(stored)
    labels = dict(meta["labels"])
    assert ds.labels([0, 5]).argmax(1).tolist() == [labels[names[0]], labels[names[5]]]
    # Items are read one by one from the zip (never the whole dataset).
    reads = []
    orig = EncodedLatentDataset._read_bytes
    monkeypatch.setattr(EncodedLatentDataset, "_read_bytes", lambda self, i: reads.append(i) or orig(self, i))
    x, lab = ds.get_batch(torch.tensor([4, 1]), generator=torch.Generator().manual_seed(5))
    assert sorted(reads) == [1, 4]
    ms = torch.from_numpy(np.stack([stored[names[4]], stored[names[1]]]))
    want = LatentCodec().sample_final(ms, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, want)
    assert x.shape == (2, 4, 4, 4) and lab.shape == (2, 10)
    # A second draw of the same items differs (fresh noise), the labels do not.
    x2, lab2 = ds.get_batch(torch.tensor([4, 1]), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(x, x2) and torch.equal(lab, lab2)
    with pytest.raises(DataError, match="latents, not images"):
        ds.uint8_images([0])


def test_encoded_zip_errors(tmp_path):
    path = make_encoded_zip(tmp_path / "enc.zip", n=2, resolution=4, label_dim=10)
    with pytest.raises(DataError, match=r"shape \[8, 4, 4\].*need float \[8, 8, 8\]"):
        open_dataset({"kind": "edm2_latents", "path": str(path), "resolution": 8, "channels": 4, "label_dim": 10})
    unlabelled = make_encoded_zip(tmp_path / "nolab.zip", n=2, resolution=4, label_dim=10, labels=False)
    with pytest.raises(DataError, match="no labels"):
        open_dataset({"kind": "edm2_latents", "path": str(unlabelled), "resolution": 4, "channels": 4,
                      "label_dim": 10})
    with pytest.raises(DataError, match="xflip"):
        open_dataset({"kind": "edm2_latents", "path": str(path), "resolution": 4, "channels": 4, "xflip": True})
