"""The prompt encoder of a text-to-image pipeline: CLIP tokenizer + CLIP text model, frozen.

`encode` gives what diffusers' StableDiffusionPipeline feeds the UNet when no clip_skip is set:
the tokenizer pads and truncates every prompt to `model_max_length` (77 for SD), and the
embedding is the text model's last hidden state [n, L, D] (no final projection, no pooling).
Read from a local pipeline folder only (`text_encoder/`, `tokenizer/`); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import AssetError, brief_reason

__all__ = ["TextEncoder", "load_text_encoder"]


class TextEncoder(torch.nn.Module):
    """Frozen (eval mode, no gradients) CLIP text encoder: `encode(prompts) -> [n, L, D]` float32."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        # A tokenizer saved without model_max_length reports a huge one: the model's positions bound it.
        length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
        self.cond_shape = (length, int(model.config.hidden_size))

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: never in training mode (no dropout)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings [n, L, D] float32 on the module's device."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not one string: encode([prompt])")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.cond_shape[0],
                                truncation=True, return_tensors="pt")
        # diffusers passes the attention mask only to encoders configured to use it (not CLIP's).
        mask = tokens.attention_mask.to(device) if getattr(self.model.config, "use_attention_mask", False) else None
        out = self.model(tokens.input_ids.to(device), attention_mask=mask)
        return out.last_hidden_state.to(torch.float32)


def load_text_encoder(folder: str | Path, device: torch.device | str = "cpu") -> TextEncoder:
    """The text encoder of the pipeline folder `folder` (its `tokenizer/` and `text_encoder/`)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(folder).expanduser()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True)
    except Exception as exc:  # missing files, corrupt weights, wrong config: transformers' many types
        raise AssetError(f"text encoder of {root} cannot be loaded ({brief_reason(exc)}): the folder needs "
                         f"tokenizer/ (a CLIPTokenizer) and text_encoder/ (a CLIPTextModel) as "
                         f"StableDiffusionPipeline.save_pretrained writes them") from None
    return TextEncoder(tokenizer, model.to(device))
