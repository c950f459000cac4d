"""Vision transformers for the pipeline's networks: DINOv2 built with timm from the original
checkpoint (a local file, never downloaded here).

Two users: FD-DINOv2 (`sida.eval.features.DINOv2Extractor`, the class token of ViT-L/14, EDM2's
second metric) and ADD's frozen discriminator feature network (`DINOv2Features`: patch tokens of
ViT-S/14 at several depths, differentiable in the input image). They live here, at the bottom of
the library, so that the training loop can build them without importing `sida.eval`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import AssetError, CheckpointError, ConfigError, brief_reason

__all__ = ["DINOV2_ARCHS", "DINOV2_URL", "DINOV2_RESOLUTION", "DINOV2_PATCH", "IMAGENET_MEAN", "IMAGENET_STD",
           "imagenet_normalize", "build_dinov2", "dinov2_pos_embed_at", "dinov2_timm_state", "DINOv2Features",
           "PixelDecoder"]

# arch -> (timm model name, class-token width). ViT-L/14 is what EDM2 reports; ViT-S/14 serves
# lighter uses (e.g. a discriminator backbone).
DINOV2_ARCHS = {"vits14": ("vit_small_patch14_dinov2", 384), "vitb14": ("vit_base_patch14_dinov2", 768),
                "vitl14": ("vit_large_patch14_dinov2", 1024)}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_pretrain.pth"
DINOV2_RESOLUTION = 224
DINOV2_PATCH = 14
DINOV2_POS_OFFSET = 0.1  # the original's interpolate_offset (bicubic, no antialias, scale-factor based)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """RGB images in [0, 1] [N, 3, H, W] -> DINOv2's input scale (ImageNet mean / std)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


def dinov2_pos_embed_at(pos_embed: torch.Tensor, grid: int, offset: float = DINOV2_POS_OFFSET) -> torch.Tensor:
    """The original DINOv2's position embedding [1, 1 + M*M, D] as its forward interpolates it for a
    grid x grid patch input: bicubic with scale factor (grid + offset) / M, no antialiasing; the
    class token's embedding is kept. Precomputing it for 224x224 inputs gives the same network."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].float()
    m = int(round(math.sqrt(patch_pos.shape[1])))
    if m * m != patch_pos.shape[1]:
        raise CheckpointError(f"DINOv2 position embedding has {patch_pos.shape[1]} patch entries, not a square")
    if m == grid:
        return pos_embed
    d = patch_pos.shape[-1]
    s = (grid + offset) / m
    out = F.interpolate(patch_pos.reshape(1, m, m, d).permute(0, 3, 1, 2), scale_factor=(s, s), mode="bicubic",
                        antialias=False)
    if out.shape[-2:] != (grid, grid):
        raise CheckpointError(f"DINOv2 position embedding resampled to {list(out.shape[-2:])}, not {grid}x{grid}")
    return torch.cat([cls_pos, out.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)], dim=1)


def build_dinov2(arch: str = "vitl14", weights: str | Path | None = None) -> torch.nn.Module:
    """DINOv2 `arch` (vits14, vitb14, vitl14) as timm's VisionTransformer for 224x224 inputs,
    returning the final-norm class token. `weights`: the original checkpoint
    (``dinov2_<arch>_pretrain.pth``, a plain state dict read weights-only); None = random weights."""
    if arch not in DINOV2_ARCHS:
        raise ConfigError(f"evaluate.dinov2_arch: unknown DINOv2 '{arch}' (known: {', '.join(DINOV2_ARCHS)})")
    import timm

    model = timm.create_model(DINOV2_ARCHS[arch][0], pretrained=False, img_size=DINOV2_RESOLUTION, num_classes=0)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise AssetError(f"DINOv2 weights {path} do not exist: run the fetch stage, or download "
                             f"{DINOV2_URL.format(arch=arch)} to that path (or set evaluate.dinov2_weights)")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = brief_reason(exc)
            raise CheckpointError(f"DINOv2 weights {path} cannot be read ({first}): download them again") from None
        model.load_state_dict(dinov2_timm_state(sd, str(path)), strict=True)
    return model.eval().requires_grad_(False)


def dinov2_timm_state(sd: dict, source: str = "DINOv2 checkpoint") -> dict:
    """The original DINOv2 state dict for timm's 224x224 model: the position embedding resampled
    as the original does at that input size, the unused mask token dropped (names are the same)."""
    if not isinstance(sd, dict) or "pos_embed" not in sd:
        raise CheckpointError(f"{source} is not a DINOv2 state dict (no pos_embed)")
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    out["pos_embed"] = dinov2_pos_embed_at(sd["pos_embed"], DINOV2_RESOLUTION // DINOV2_PATCH)
    return out


class PixelDecoder(torch.nn.Module):
    """A latent teacher's frozen VAE decoder with gradients to the latents: UNet latents -> images
    (about [-1, 1]), for ADD's DINOv2 discriminator, which reads pixels (ADD distils latent models
    with a discriminator on decoded images). `vae` is a diffusers AutoencoderKL; not clamped, so
    the student's adversarial gradient survives out-of-range pixels (ours)."""

    def __init__(self, vae: torch.nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)

    def train(self, mode: bool = True) -> "PixelDecoder":
        return super().train(False)  # frozen

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.float() / self.scaling_factor).sample


class DINOv2Features(torch.nn.Module):
    """ADD's DINOv2 feature network: images in [-1, 1] -> the patch tokens [B, N, C] after each of
    the blocks `layers` (class token dropped; ViT-S/14 at 224x224: four [B, 256, 384] for blocks
    2, 5, 8, 11, what ADD's heads read). Preprocessing as DINOv2 was trained: (x + 1) / 2, gray
    images repeated to RGB, bicubic resize to 224x224, ImageNet mean/std; all differentiable, so
    the student's adversarial loss reaches its pixels. A latent teacher's inputs are decoded first
    (`decoder`, a `PixelDecoder`). The ViT is frozen and stays in eval mode; labels are ignored
    (the heads are conditioned, the features are not). `with_class_token` also gives ADD's image
    embedding c_img: the final-norm class token, without gradient."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int] = (2, 5, 8, 11),
                 decoder: Optional[torch.nn.Module] = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.decoder = decoder
        depth = len(getattr(model, "blocks", []))
        self.layers = [int(i) for i in layers]
        if depth and max(self.layers) >= depth:
            raise ConfigError(f"distill.add_features.layers: the ViT has {depth} blocks, no block {max(self.layers)}")
        self.embed_dim = int(model.num_features)

    def train(self, mode: bool = True) -> "DINOv2Features":
        super().train(mode)
        self.model.eval()
        if self.decoder is not None:
            self.decoder.eval()
        return self

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (or latents, decoded) -> the ViT's normalised 224x224 RGB input."""
        if self.decoder is not None:
            x = self.decoder(x)
        x = (x.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION), mode="bicubic", align_corners=False)
        return imagenet_normalize(x)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        return list(self.model.forward_intermediates(self.pixels(x), indices=self.layers, output_fmt="NLC",
                                                     intermediates_only=True))

    @torch.no_grad()
    def with_class_token(self, x: torch.Tensor) -> tuple[List[torch.Tensor], torch.Tensor]:
        """(`forward(x)`, the final-norm class token [B, C]) of images (or latents) x from one pass,
        no gradient: a real image's features for the heads and ADD's c_img together."""
        final, feats = self.model.forward_intermediates(self.pixels(x), indices=self.layers, output_fmt="NLC",
                                                        intermediates_only=False)
        return list(feats), final[:, 0].float()
