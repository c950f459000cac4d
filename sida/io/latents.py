"""The latent space of EDM2's ImageNet-512 models: the Stable Diffusion VAE and its scaling.

EDM2 trains on *final latents*: the VAE encoder's posterior (raw mean, raw std per channel) is
sampled, x = mean + N(0, 1) std, then scaled per channel to std 0.5:
    final = raw * scale + bias,  scale = final_std / raw_std,  bias = final_mean - raw_mean * scale
with raw_mean [5.81, 3.25, 0.12, -2.15], raw_std [4.17, 4.62, 3.71, 3.28], final (0, 0.5) (EDM2's
StabilityVAEEncoder; the constants are recorded in every published snapshot, and the fetch stage
compares them). Decoding inverts the scaling, runs the VAE decoder (pixels in [0, 1]), clamps to
[0, 1], multiplies by 255 and truncates to uint8 — not EDM's [-1, 1] quantisation (x*127.5+128).

The VAE is diffusers' `AutoencoderKL` (stabilityai/sd-vae-ft-mse) read from a LOCAL folder only
(``local_files_only``, hub offline): the fetch stage places it; nothing here downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import AssetError, ConfigError, brief_reason

VAE_NAME = "stabilityai/sd-vae-ft-mse"
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN = 0.0
FINAL_STD = 0.5
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class LatentCodec:
    """Per-channel affine map between raw VAE latents and EDM2's final latents (float32 as EDM2)."""

    raw_mean: Sequence[float] = RAW_MEAN
    raw_std: Sequence[float] = RAW_STD
    final_mean: float = FINAL_MEAN
    final_std: float = FINAL_STD

    @property
    def scale(self) -> np.ndarray:
        """final_std / raw_std per channel, computed in float32."""
        return np.float32(self.final_std) / np.asarray(self.raw_std, dtype=np.float32)

    @property
    def bias(self) -> np.ndarray:
        """final_mean - raw_mean * scale per channel, float32."""
        return np.float32(self.final_mean) - np.asarray(self.raw_mean, dtype=np.float32) * self.scale

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(self.scale, device=x.device).reshape(1, -1, 1, 1)
        b = torch.as_tensor(self.bias, device=x.device).reshape(1, -1, 1, 1)
        return s, b

    def sample_final(self, mean_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Final latents from stored [B, 2C, H, W] (C means then C stds): (mean + N(0,1) std) scale + bias."""
        mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        s, b = self._affine(mean)
        return (mean + noise * std) * s + b

    def to_raw(self, final: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents from final latents: (final - bias) / scale."""
        s, b = self._affine(final)
        return (final.to(torch.float32) - b) / s

    def check_against(self, scale: Any, bias: Any, source: str) -> None:
        """Raise ConfigError when a snapshot's recorded scale/bias differ from ours (rtol 1e-5)."""
        for name, mine, theirs in (("scale", self.scale, scale), ("bias", self.bias, bias)):
            theirs = np.asarray(theirs, dtype=np.float64).reshape(-1)
            if theirs.shape != mine.shape or not np.allclose(theirs, mine, rtol=1e-5, atol=1e-7):
                raise ConfigError(f"{source} encodes latents with {name} {np.round(theirs, 5).tolist()} but the "
                                  f"config's latent section gives {np.round(mine, 5).tolist()}: set latent.raw_mean/"
                                  f"raw_std/final_std to the snapshot's values")


def pixels_to_vae(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [0, 1], what EDM2 feeds the VAE encoder."""
    return images_u8.to(torch.float32) / 255


def vae_to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """VAE decoder output -> uint8: clamp to [0, 1], x255, truncate (EDM2's decode)."""
    return decoded.to(torch.float32).clamp(0, 1).mul(255).to(torch.uint8)


def uint8_to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] floats that `sida.io.images.quantize` maps back to exactly the same uint8
    (u / 127.5 - 1 -> u + 0.5 -> truncated u), so decoded images pass through the pixel-space
    evaluation and grid code unchanged."""
    return images_u8.to(torch.float32) / 127.5 - 1


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """diffusers' AutoencoderKL from a local folder (config.json + weights), eval, no gradients.

    Never contacts the hub: ``local_files_only`` and HF_HUB_OFFLINE for the call. A missing or
    unreadable folder is one `AssetError` line naming what to place where.
    """
    path = Path(path)
    hint = (f"run the fetch stage, or place the files of {VAE_NAME} ({', '.join(VAE_FILES)}) in {path} "
            f"(or set latent.vae)")
    if not (path / "config.json").is_file():
        raise AssetError(f"VAE folder {path} has no config.json: {hint}")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except ImportError:
        raise AssetError("the diffusers package is missing: pip install -r envs/requirements.txt") from None
    except Exception as exc:  # missing weights, corrupt safetensors, wrong config, ...
        first = brief_reason(exc)
        raise AssetError(f"VAE folder {path} cannot be loaded ({first}): {hint}") from None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return vae.eval().requires_grad_(False).to(device)


class LatentDecoder:
    """Final latents -> uint8 images through the VAE decoder, in batches (EDM2's decode)."""

    def __init__(self, vae: torch.nn.Module, codec: LatentCodec = LatentCodec(), batch: int = 8) -> None:
        self.vae, self.codec, self.batch = vae, codec, int(batch)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        raw = self.codec.to_raw(latents)
        out = [self.vae.decode(chunk.to(next(self.vae.parameters()).dtype)).sample for chunk in raw.split(self.batch)]
        return vae_to_uint8(torch.cat(out))

    def unit(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded images as [-1, 1] floats (see `uint8_to_unit`)."""
        return uint8_to_unit(self(latents))

    @torch.no_grad()
    def encode(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> stored raw posterior [B, 8, h, w] (mean, std), as EDM2's dataset tool writes."""
        d = self.vae.encode(pixels_to_vae(images_u8)).latent_dist
        return torch.cat([d.mean, d.std], dim=1)


def codec_from_config(cfg: dict) -> LatentCodec:
    """The `latent:` section's constants."""
    lat = cfg.get("latent") or {}
    return LatentCodec(tuple(lat.get("raw_mean", RAW_MEAN)), tuple(lat.get("raw_std", RAW_STD)),
                       float(lat.get("final_mean", FINAL_MEAN)), float(lat.get("final_std", FINAL_STD)))


def is_latent(cfg: dict) -> bool:
    """True for configs whose data are EDM2 encoded latents (the networks work in latent space)."""
    return (cfg.get("data") or {}).get("kind") == "edm2_latents"


def vae_path(cfg: dict) -> Path:
    """`latent.vae`, default the fetch stage's output <results_dir>/<experiment>/fetch/vae."""
    p = (cfg.get("latent") or {}).get("vae")
    return Path(p) if p else Path(cfg["results_dir"]) / cfg["experiment"] / "fetch" / "vae"


def decoder_from_config(cfg: dict, device: torch.device | str = "cpu") -> LatentDecoder | None:
    """The config's latent decoder (None for pixel-space configs)."""
    if not is_latent(cfg):
        return None
    lat = cfg.get("latent") or {}
    return LatentDecoder(load_vae(vae_path(cfg), device), codec_from_config(cfg), lat.get("decode_batch", 8))
