"""Which diffusers UNet configs the wrappers support: plain Python (no torch), so the config check
of a teacher folder (`sida.io.diffusers_teacher.check_folder`) and the network agree."""

from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["text_unet_problem"]

# Config keys whose non-null values add inputs SD 1.x / 2.x UNets do not have (Kandinsky, LCM's
# guidance embedding, class-conditioned variants); SDXL's addition_embed_type is named apart.
_EXTRA_INPUTS = ("class_embed_type", "num_class_embeds", "encoder_hid_dim_type", "time_cond_proj_dim")
# SD 1.x / 2.x's block types, the ones the adapter's calls follow (diffusers' forward order and arguments).
_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
           "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)}


def text_unet_problem(config: Dict[str, Any]) -> Optional[str]:
    """Why a UNet2DConditionModel config is not supported (one phrase naming what to do), or None."""
    if config.get("addition_embed_type") is not None:
        return (f"addition_embed_type {config['addition_embed_type']!r} (an SDXL-style UNet): not supported yet "
                f"(SDXL comes with a later issue)")
    extra = [k for k in _EXTRA_INPUTS if config.get(k) is not None]
    if extra:
        return (f"{', '.join(extra)} set: only SD 1.x / 2.x UNets (inputs: the noisy image, the timestep, the prompt "
                f"embedding) are supported")
    for key, allowed in _BLOCKS.items():
        value = config.get(key, allowed[0])
        odd = sorted({str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v not in allowed})
        if odd:
            return (f"{key} {', '.join(odd)}: only SD 1.x / 2.x blocks ({', '.join(str(a) for a in allowed)}) "
                    f"are supported")
    width = config.get("cross_attention_dim")
    if not isinstance(width, int):
        return f"cross_attention_dim {width!r}: one width for every block is supported (SD 1.x / 2.x)"
    return None
