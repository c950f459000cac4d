"""The latent space of a Stable Diffusion pipeline: its `vae/` (AutoencoderKL) and scaling factor.

SD's UNet works on latents = VAE latents x `scaling_factor` (0.18215 for SD 1.x / 2.x): `encode`
maps images in [-1, 1] there (the posterior mean, not a sample: deterministic, and what the data
side of distillation needs), `decode` maps back as StableDiffusionPipeline does (divide by the
factor, decode, clamp to [-1, 1]). Local files only; EDM2's differently scaled latents are
`sida.io.latents`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AssetError, brief_reason

__all__ = ["LatentVAE", "load_vae"]


class LatentVAE(torch.nn.Module):
    """Frozen AutoencoderKL with the pipeline's scaling: images [-1, 1] <-> UNet latents."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)

    def train(self, mode: bool = True) -> "LatentVAE":
        return super().train(False)  # frozen

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] in [-1, 1] -> posterior mean x scaling_factor, float32."""
        x = images.to(next(self.vae.parameters()).device, torch.float32)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> images in [-1, 1] (float32, clamped)."""
        z = latents.to(next(self.vae.parameters()).device, torch.float32) / self.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)


def load_vae(folder: str | Path, device: torch.device | str = "cpu") -> LatentVAE:
    """The VAE of pipeline folder `folder` (its `vae/`), or of a VAE folder itself (config.json there)."""
    from diffusers import AutoencoderKL

    root = Path(folder).expanduser()
    path = root if (root / "config.json").is_file() else root / "vae"
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # missing files, corrupt weights, wrong config: diffusers' many types
        raise AssetError(f"VAE {path} cannot be loaded ({brief_reason(exc)}): place the pipeline's vae/ "
                         f"(config.json, diffusion_pytorch_model.safetensors) there") from None
    return LatentVAE(vae.to(device))
