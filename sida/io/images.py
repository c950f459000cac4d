"""Image helpers: [-1, 1] float tensors to uint8, and sample grids as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 as EDM saves them: (x * 127.5 + 128).clip(0, 255) truncated."""
    return (images.detach().to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW → uint8 NHWC numpy (`quantize`, then channels last on the host)."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


def grid_array(images_u8: np.ndarray, cols: int) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC array with `cols` columns."""
    n, h, w, c = images_u8.shape
    rows = (n + cols - 1) // cols
    out = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = images_u8[i]
    return out


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, cols: int, upscale: int = 1) -> None:
    """Write a sample grid PNG atomically (float [-1,1] NCHW tensors or uint8 NHWC arrays)."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else images
    grid = grid_array(arr, cols)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with atomic_write(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
