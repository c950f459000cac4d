"""An SDXL `UNet2DConditionModel` (addition_embed_type "text_time") as an EDM denoiser.

SDXL's UNet takes three conditions besides x and t (diffusers' StableDiffusionXLPipeline):
`encoder_hidden_states` = both text encoders' penultimate hidden states concatenated [n, L, D]
(D = 768 + 1280 = the UNet's cross_attention_dim), `text_embeds` = the pooled, projected
embedding of the second encoder [n, P] (P = 1280), and `time_ids` = (original height, width,
crop top, left, target height, width), its micro-conditioning.

The loop carries ONE batch-first condition tensor (the draws index it by batch, guidance
concatenates it), so the prompt's two parts are packed here, and only here:

    cond [n, L + 1, D] = the hidden states' L rows, then one row holding the pooled vector in its
    first P columns and zeros after (`pack_sdxl_condition`; `unpack_sdxl_condition` inverts it).

`time_ids` are a constant of the network: (image_size, image_size, 0, 0, image_size, image_size)
with image_size the generated images' side in pixels (1024 for SDXL), what the pipeline passes by
default. The empty prompt's condition is zeros (SDXL's `force_zeros_for_empty_prompt`, see
`sida.io.text_encoder.SDXLTextEncoder`), so `uncond` stays zeros. The rest is the SD wrapper's
(`sida.nets.diffusers_text`): the VP <-> EDM correspondence, guidance, the SiDA return flags.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from .diffusers_config import sdxl_pooled_problem, text_unet_problem
from .diffusers_text import DiffusersTextPrecond, _TextUNetAdapter

__all__ = ["DiffusersSDXLPrecond", "pack_sdxl_condition", "unpack_sdxl_condition", "sdxl_time_ids"]


def pack_sdxl_condition(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[n, L, D] hidden states and [n, P] pooled embedding (P <= D) -> one [n, L + 1, D] condition."""
    row = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])
    row[:, 0, :pooled.shape[1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, row], dim=1)


def unpack_sdxl_condition(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_sdxl_condition`: ([n, L, D] hidden states, [n, pooled_dim] pooled)."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def sdxl_time_ids(image_size: int) -> torch.Tensor:
    """[1, 6] micro-conditioning of square images of side `image_size` px, uncropped."""
    s = float(image_size)
    return torch.tensor([[s, s, 0.0, 0.0, s, s]])


class _SDXLUNetAdapter(_TextUNetAdapter):
    """The text adapter whose context is the packed SDXL condition: the pooled row and the time ids
    go through the UNet's own `get_aug_embed` into the time embedding, the hidden states to the
    cross-attention. `pooled_dim` and the `time_ids` buffer are set by `DiffusersSDXLPrecond`."""

    sdxl = True
    pooled_dim: int

    def _condition(self, emb: torch.Tensor, context: torch.Tensor):
        hidden, pooled = unpack_sdxl_condition(context, self.pooled_dim)
        time_ids = self.time_ids.to(emb.device).expand(context.shape[0], -1)
        aug = self.unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden,
                                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        return super()._condition(emb + aug, hidden)


class DiffusersSDXLPrecond(DiffusersTextPrecond):
    """EDM denoiser D(x; sigma, c) around an SDXL UNet; c is the packed condition [n, L + 1, D]
    (`pack_sdxl_condition`). `init_kwargs` are the SD wrapper's (`cond_shape` = (L + 1, D)) plus
    `pooled_dim` (P, the second encoder's projection width) and `image_size` (the side in pixels
    that the time ids name)."""

    adapter = _SDXLUNetAdapter

    def __init__(self, unet_config: Dict[str, Any], alphas_cumprod: Sequence[float], prediction_type: str = "epsilon",
                 *, cond_shape: Sequence[int], pooled_dim: int, image_size: int, **kwargs: Any) -> None:
        problem = text_unet_problem(unet_config, sdxl=True) or sdxl_pooled_problem(unet_config, int(pooled_dim))
        if problem:  # before building the UNet (2.6 B parameters for SDXL)
            raise ValueError(f"UNet2DConditionModel: {problem}")
        super().__init__(unet_config, alphas_cumprod, prediction_type, cond_shape=cond_shape, **kwargs)
        self.init_kwargs.update(pooled_dim=int(pooled_dim), image_size=int(image_size))
        self.pooled_dim, self.image_size = int(pooled_dim), int(image_size)
        self.model.pooled_dim = self.pooled_dim
        # Derived from init_kwargs, so not saved: state dicts hold the UNet and `uncond` as for SD.
        self.model.register_buffer("time_ids", sdxl_time_ids(image_size), persistent=False)
