"""The prompt encoder of a text-to-image pipeline: CLIP tokenizer + CLIP text model, frozen.

`encode` gives what diffusers' StableDiffusionPipeline feeds the UNet when no clip_skip is set:
the tokenizer pads and truncates every prompt to `model_max_length` (77 for SD), and the
embedding is the text model's last hidden state [n, L, D] (no final projection, no pooling).

An SDXL pipeline has two (`SDXLTextEncoder`): its condition is what StableDiffusionXLPipeline
feeds the UNet, packed into one tensor by `sida.nets.diffusers_sdxl.pack_sdxl_condition`.
Read from a local pipeline folder only (`text_encoder/`, `tokenizer/`, and SDXL's
`text_encoder_2/`, `tokenizer_2/`); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import AssetError, brief_reason

__all__ = ["TextEncoder", "SDXLTextEncoder", "load_text_encoder"]


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
    def outputs(self, prompts: Sequence[str], **kwargs: Any) -> Any:
        """The text model's output for the prompts, tokenized as the pipelines do (`kwargs` go to
        the model, e.g. output_hidden_states)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not one string: encode([prompt])")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.cond_shape[0],
                                truncation=True, return_tensors="pt")
        # diffusers passes the attention mask only to encoders configured to use it (not CLIP's).
        mask = tokens.attention_mask.to(device) if getattr(self.model.config, "use_attention_mask", False) else None
        return self.model(tokens.input_ids.to(device), attention_mask=mask, **kwargs)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings [n, L, D] float32 on the module's device."""
        return self.outputs(prompts).last_hidden_state.to(torch.float32)


class SDXLTextEncoder(torch.nn.Module):
    """SDXL's two frozen encoders: `encode(prompts) -> [n, L + 1, D1 + D2]` float32, the packed
    condition (penultimate hidden states of both, concatenated; the second's pooled projection
    `text_embeds` in the last row), as StableDiffusionXLPipeline.encode_prompt computes them
    without clip_skip. With `force_zeros` (the pipeline's `force_zeros_for_empty_prompt`, true for
    SDXL) the empty prompt's condition is zeros, as the pipeline's unconditional half."""

    def __init__(self, first: TextEncoder, second: TextEncoder, force_zeros: bool = True) -> None:
        super().__init__()
        self.first, self.second, self.force_zeros = first, second, bool(force_zeros)
        (l1, d1), (l2, d2) = first.cond_shape, second.cond_shape
        if l1 != l2:
            raise AssetError(f"SDXL text encoders: tokenizer/ pads to {l1} tokens but tokenizer_2/ to {l2}: the "
                             f"pipeline's two tokenizers share one length; place the pipeline's own")
        self.pooled_dim = int(second.model.config.projection_dim)
        self.cond_shape = (l1 + 1, d1 + d2)

    def train(self, mode: bool = True) -> "SDXLTextEncoder":
        return super().train(False)  # frozen

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Packed SDXL conditions [n, L + 1, D1 + D2] float32 on the module's device."""
        from ..nets.diffusers_sdxl import pack_sdxl_condition

        one, two = (e.outputs(prompts, output_hidden_states=True) for e in (self.first, self.second))
        hidden = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        cond = pack_sdxl_condition(hidden.to(torch.float32), two.text_embeds.to(torch.float32))
        if self.force_zeros:
            empty = torch.tensor([p == "" for p in prompts], device=cond.device)
            cond = torch.where(empty.reshape(-1, 1, 1), torch.zeros_like(cond), cond)
        return cond


def _load_clip(root: Path, suffix: str, device: torch.device | str, projection: bool = False) -> TextEncoder:
    """tokenizer{suffix}/ and text_encoder{suffix}/ of `root` (a CLIPTextModelWithProjection for SDXL's second)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / f"tokenizer{suffix}"), local_files_only=True)
        model = cls.from_pretrained(str(root / f"text_encoder{suffix}"), local_files_only=True)
    except Exception as exc:  # missing files, corrupt weights, wrong config: transformers' many types
        raise AssetError(f"text encoder of {root} cannot be loaded ({brief_reason(exc)}): the folder needs "
                         f"tokenizer{suffix}/ (a CLIPTokenizer) and text_encoder{suffix}/ (a {cls.__name__}) as "
                         f"the pipeline's save_pretrained writes them") from None
    return TextEncoder(tokenizer, model.to(device))


def load_text_encoder(folder: str | Path, device: torch.device | str = "cpu") -> TextEncoder | SDXLTextEncoder:
    """The text encoder of the pipeline folder `folder` (its `tokenizer/` and `text_encoder/`); for
    an SDXL pipeline (with `text_encoder_2/`) both of its encoders."""
    root = Path(folder).expanduser()
    first = _load_clip(root, "", device)
    if not (root / "text_encoder_2").is_dir():
        return first
    index = root / "model_index.json"
    force_zeros = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
    return SDXLTextEncoder(first, _load_clip(root, "_2", device, projection=True), force_zeros)
