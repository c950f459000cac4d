"""The text side of a run on a text-to-image teacher: its frozen text encoder and VAE (read from
the teacher's pipeline folder, which its network records as `pipeline_dir`) around the run's data.

Training draws prompt embeddings from a prompt set (SiD) or captioned images encoded into the
teacher's space (SiDA, SiD2A); sampling and evaluation encode prompts with the same encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import AssetError
from .diffusers_teacher import check_folder
from .latent_vae import LatentVAE, load_vae
from .prompts import open_text_dataset
from .text_encoder import TextEncoder, load_text_encoder


def is_text_network(net: torch.nn.Module) -> bool:
    """A network conditioned on prompt embeddings (it carries the empty prompt's)."""
    return hasattr(net, "uncond")


def pipeline_dir(net: torch.nn.Module) -> Path:
    """The teacher pipeline folder a text network records; one line when it is gone."""
    where = getattr(net, "pipeline_dir", None)
    if not where or not Path(where).is_dir():
        raise AssetError(f"the text teacher's pipeline folder {where} (recorded in its network file) does not exist: "
                         f"rerun the fetch stage, or place the folder there again")
    return Path(where)


def text_encoder_of(net: torch.nn.Module, device: torch.device | str) -> TextEncoder:
    """The frozen text encoder of a text network's pipeline."""
    return load_text_encoder(pipeline_dir(net), device)


def vae_of(net: torch.nn.Module, device: torch.device | str) -> LatentVAE | None:
    """The VAE of a latent text network's pipeline; None for a pixel-space pipeline (no vae/)."""
    folder = check_folder(pipeline_dir(net))
    return None if folder.vae_dir is None else load_vae(folder.vae_dir, device)


def open_run_text_dataset(data: dict, net: torch.nn.Module, device: torch.device | str, cache_dir: str | Path) -> Any:
    """The prompt set or captioned images of `data`, encoded by `net`'s text encoder (and its images
    by its VAE, cached in `cache_dir`)."""
    encoder = text_encoder_of(net, device)
    vae = vae_of(net, device)
    encoder_id = None if vae is None else f"{pipeline_dir(net) / 'vae'} x {vae.scaling_factor}"
    return open_text_dataset(data, encoder.encode, None if vae is None else vae.encode, cache_dir, encoder_id)
