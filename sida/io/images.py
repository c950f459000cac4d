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


def auto_upscale(resolution: int, min_cell: int = 48) -> int:
    """Nearest-neighbour factor that makes a cell at least `min_cell` pixels (8x8 digits -> 6)."""
    return max(1, -(-min_cell // max(1, int(resolution))))


def grid_array(images_u8: np.ndarray, cols: int, upscale: int = 1, gap: int = 0, gap_value: int = 255) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC array with `cols` columns.

    Each image is enlarged `upscale` times by pixel repetition (nearest neighbour: no blur, the
    pixels stay visible), and cells are separated by `gap` pixels of `gap_value` (none at the border).
    """
    imgs = np.asarray(images_u8)
    if upscale > 1:
        imgs = imgs.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = imgs.shape
    rows = (n + cols - 1) // cols
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, c), gap_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = r * (h + gap), q * (w + gap)
        out[y:y + h, x:x + w] = imgs[i]
    return out


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, cols: int, upscale: int | None = None,
              gap: int | None = None) -> None:
    """Write a sample grid PNG atomically (float [-1,1] NCHW tensors or uint8 NHWC arrays).

    `upscale` None: `auto_upscale` of the image size; `gap` None: 2 pixels, or 1 for a 1:1 grid
    (white lines between cells, so dark-background digits do not run into each other).
    """
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else images
    upscale = auto_upscale(arr.shape[1]) if upscale is None else upscale
    gap = (2 if upscale > 1 else 1) if gap is None else gap
    grid = grid_array(arr, cols, upscale, gap)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_write(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
