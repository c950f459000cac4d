"""The text-to-image teacher as a diffusers pipeline folder, the layout Stable Diffusion ships:
`model_index.json` (`StableDiffusionPipeline`), `unet/`, `text_encoder/`, `tokenizer/`,
`scheduler/`, and no `vae/`: a pipeline folder without a VAE is this project's convention for
a pixel-space text pipeline (the UNet works on images, not latents).

The folder is written beside its target and renamed into place, so a killed writer leaves the
previous folder or the new one, never a mixture.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, FileSystemError, describe_os_error
from .atomic import atomic_write_json
from .clip_text import load_clip_tokenizer, write_clip_tokenizer

PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def model_index(scheduler: Any) -> dict:
    """model_index.json of a VAE-less StableDiffusionPipeline (null entries: absent parts)."""
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", type(scheduler).__name__],
            "vae": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
            "image_encoder": [None, None], "requires_safety_checker": False}


def save_text_pipeline(directory: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                       scheduler: Any, max_length: int) -> Path:
    """Write the pipeline folder `directory` (replacing one that is there); returns it."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        unet.save_pretrained(tmp / "unet")
        text_encoder.save_pretrained(tmp / "text_encoder")
        write_clip_tokenizer(tmp / "tokenizer", max_length)
        scheduler.save_pretrained(tmp / "scheduler")
        atomic_write_json(tmp / "model_index.json", model_index(scheduler))
        if directory.exists():  # a rename cannot replace a non-empty folder: move it aside first
            os.replace(directory, old)
        os.replace(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileSystemError(describe_os_error(exc, directory, "write")) from exc
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_text_pipeline(directory: str | Path) -> dict[str, Any]:
    """The parts of a pipeline folder: {"unet", "text_encoder", "tokenizer", "scheduler"} (eval mode, frozen)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    directory = Path(directory)
    missing = [p for p in PARTS if not (directory / p).is_dir()]
    if missing or not (directory / "model_index.json").is_file():
        raise CheckpointError(f"{directory} is not a text pipeline folder (missing "
                              f"{', '.join(missing) or 'model_index.json'}): pass the teacher stage's "
                              f"<out>/pipeline folder")
    try:
        unet = UNet2DConditionModel.from_pretrained(directory / "unet")
        text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder")
        tokenizer = load_clip_tokenizer(directory / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"text pipeline {directory} is unreadable ({str(exc).splitlines()[0]}): "
                              f"rerun the teacher stage to write it again") from None
    return {"unet": unet.eval().requires_grad_(False), "text_encoder": text_encoder.eval().requires_grad_(False),
            "tokenizer": tokenizer, "scheduler": scheduler}
