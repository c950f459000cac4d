"""Which diffusers UNet configs the wrappers support: plain Python (no torch), so the config check
of a teacher folder (`sida.io.diffusers_teacher.check_folder`) and the network agree."""

from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["text_unet_problem", "sdxl_pooled_problem", "SDXL_TIME_IDS"]

#: SDXL's micro-conditioning: (original height, width, crop top, left, target height, width).
SDXL_TIME_IDS = 6
# Config keys whose non-null values add inputs SD 1.x / 2.x / SDXL UNets do not have (Kandinsky,
# LCM's guidance embedding, class-conditioned variants); addition_embed_type is checked apart.
_EXTRA_INPUTS = ("class_embed_type", "num_class_embeds", "encoder_hid_dim_type", "time_cond_proj_dim")
# SD 1.x / 2.x's (and SDXL's) block types, the ones the adapter's calls follow (diffusers' forward order and arguments).
_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
           "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)}


def text_unet_problem(config: Dict[str, Any], sdxl: bool = False) -> Optional[str]:
    """Why a UNet2DConditionModel config is not supported (one phrase naming what to do), or None.
    `sdxl`: the UNet of a StableDiffusionXLPipeline (addition_embed_type "text_time") is expected."""
    added = config.get("addition_embed_type")
    if added == "text_time" and not sdxl:
        return ("addition_embed_type 'text_time' (an SDXL UNet): load it from its StableDiffusionXLPipeline folder "
                "(with text_encoder_2/ and tokenizer_2/)")
    if sdxl and added != "text_time":
        return (f"addition_embed_type {added!r}: an SDXL pipeline's UNet has 'text_time' (pooled text and size "
                f"embeddings); place the pipeline's own unet/")
    if added not in (None, "text_time"):
        return (f"addition_embed_type {added!r}: only SD 1.x / 2.x UNets (none) and SDXL's ('text_time') are "
                f"supported")
    extra = [k for k in _EXTRA_INPUTS if config.get(k) is not None]
    if extra:
        return (f"{', '.join(extra)} set: only SD 1.x / 2.x / SDXL UNets (inputs: the noisy image, the timestep, the "
                f"prompt embedding, SDXL's pooled embedding and sizes) are supported")
    for key, allowed in _BLOCKS.items():
        value = config.get(key, allowed[0])
        odd = sorted({str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v not in allowed})
        if odd:
            return (f"{key} {', '.join(odd)}: only SD 1.x / 2.x and SDXL blocks ({', '.join(str(a) for a in allowed)}) "
                    f"are supported")
    width = config.get("cross_attention_dim")
    if not isinstance(width, int):
        return f"cross_attention_dim {width!r}: one width for every block is supported (SD 1.x / 2.x)"
    return None


def sdxl_pooled_problem(config: Dict[str, Any], pooled_dim: int) -> Optional[str]:
    """Why an SDXL UNet config cannot take a pooled prompt embedding of width `pooled_dim` (its
    add_embedding reads the pooled embedding and the 6 time ids' sinusoids), or None."""
    step, want = config.get("addition_time_embed_dim"), config.get("projection_class_embeddings_input_dim")
    if not isinstance(step, int) or not isinstance(want, int):
        return (f"addition_time_embed_dim {step!r} and projection_class_embeddings_input_dim {want!r}: an SDXL UNet "
                f"sets both; place the pipeline's own unet/")
    if pooled_dim + SDXL_TIME_IDS * step != want:
        return (f"the pooled text embedding's width {pooled_dim} + {SDXL_TIME_IDS} time ids x {step} differs from "
                f"the UNet's add_embedding input {want} (projection_class_embeddings_input_dim): text_encoder_2/ "
                f"is not this UNet's (or the pipeline is a refiner, which is not supported); place the pipeline's own")
    if pooled_dim > config.get("cross_attention_dim", 0):
        return (f"the pooled text embedding's width {pooled_dim} exceeds the prompt embedding's "
                f"{config.get('cross_attention_dim')}: it cannot ride in the condition's extra row")
    return None
