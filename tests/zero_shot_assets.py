"""Stand-ins for the zero-shot COCO evaluation's networks, shared by its tests: a tiny open_clip
model with random weights (registered under `TINY_CLIP`, saved to a file) for ViT-g-14, and a
2x2 average-pool extractor for clean-mode Inception (statistics recomputable by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sida.eval.features import Extractor

TINY_CLIP = "sida-tiny-clip"
CLIP_SIZE = 16  # the tiny CLIP's input side


def save_tiny_clip(folder: Path) -> Path:
    """Register `TINY_CLIP` with open_clip and write its random weights (seed 0) to folder/tiny.bin."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": CLIP_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None, pretrained_text=False)
    torch.save(model.state_dict(), folder / "tiny.bin")
    return folder / "tiny.bin"


class PoolExtractor(Extractor):
    """Stands in for clean-mode Inception: features are the 2x2 average pool of the image (12-d),
    so the statistics can be recomputed by hand."""

    name, mode, feature_dim, sha256 = "inception", "clean", 12, "0" * 64
    metric_key, label = "fid", "FID"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor):
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1), None
