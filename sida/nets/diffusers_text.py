"""A diffusers text-to-image `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x) as an EDM denoiser.

The VP <-> EDM correspondence is the pixel wrapper's (`sida.nets.diffusers_vp`: sigma table,
fractional timestep, c_skip / c_out / c_in by prediction type); this module adds the condition:

- D(x; sigma, c) with c the prompt embedding [n, L, D] (the text encoder's last hidden state, see
  `sida.io.text_encoder`), passed as `encoder_hidden_states` to the blocks with cross-attention.
  It travels in the third argument of our networks' call, where class labels go elsewhere.
- `uncond` (a persistent buffer [1, L, D]) is the embedding of the empty prompt "": the condition
  when none is given, and classifier-free guidance's unconditional half (`sida.nets.guidance`).
  It is saved in state dicts, so a network file alone can be guided.
- x lives where the UNet does: pixels for a pipeline without a VAE, otherwise the VAE's latents
  times its `scaling_factor` (what SD's UNet was trained on; `sida.io.diffusers_teacher.LatentVAE`).

Supported UNets are SD 1.5 / 2.1's: CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
CrossAttnUpBlock2D, UpBlock2D, no class or additional embeddings (SDXL's `addition_embed_type`
"text_time", which needs pooled embeddings and size ids, is `sida.nets.diffusers_sdxl`'s).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from .diffusers_config import text_unet_problem
from .diffusers_vp import _DiffusersPrecond, _UNetAdapter
from .precond import Output

__all__ = ["DiffusersTextPrecond"]


class _TextUNetAdapter(_UNetAdapter):
    """A UNet2DConditionModel behind our UNets' call; the third argument is the prompt embedding."""

    sdxl = False  # which UNets `text_unet_problem` accepts (SDXL's adapter sets it)

    @classmethod
    def _build(cls, config: Dict[str, Any]) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel  # late: importing diffusers costs seconds

        problem = text_unet_problem(config, sdxl=cls.sdxl)
        if problem:
            raise ValueError(f"UNet2DConditionModel: {problem}")
        return UNet2DConditionModel(**config)

    def _condition(self, emb: torch.Tensor, context: Optional[torch.Tensor]):
        """(embedding, context): no class embedding (refused by `_build`); the prompt embedding."""
        if self.unet.time_embed_act is not None:
            emb = self.unet.time_embed_act(emb)
        return emb, context.to(emb.dtype)


class DiffusersTextPrecond(_DiffusersPrecond):
    """EDM denoiser D(x; sigma, c) around a diffusers UNet2DConditionModel with a VP schedule.

    Rebuildable from `init_kwargs`: `unet_config` (config.json without diffusers' private keys),
    `alphas_cumprod`, `prediction_type`, `cond_shape` (L, D) of the prompt embedding, `dropout`
    (overrides the UNet's), `pipeline_dir` (the teacher's pipeline folder, where the text encoder,
    tokenizer and VAE are: informational, carried to the generator and its export). The third
    argument of `forward` is the condition: prompt embeddings [n, L, D] (or [1, L, D], broadcast),
    None for `uncond` (the empty prompt's embedding; zeros until the loader sets it).
    """

    adapter = _TextUNetAdapter

    def __init__(self, unet_config: Dict[str, Any], alphas_cumprod: Sequence[float], prediction_type: str = "epsilon",
                 *, cond_shape: Sequence[int], img_resolution: Optional[int] = None,
                 img_channels: Optional[int] = None, label_dim: int = 0, use_fp16: bool = False,
                 dropout: Optional[float] = None, pipeline_dir: Optional[str] = None) -> None:
        super().__init__()
        if label_dim:
            raise ValueError("DiffusersTextPrecond is conditioned on prompts: label_dim must be 0")
        L, D = (int(v) for v in cond_shape)
        width = unet_config.get("cross_attention_dim")
        if width != D:
            raise ValueError(f"cond_shape {(L, D)}: the prompt embedding's width {D} must be the UNet's "
                             f"cross_attention_dim {width}")
        self._init_diffusers(unet_config, alphas_cumprod, prediction_type, img_resolution, img_channels, 0, use_fp16,
                             dropout, cond_shape=[L, D],
                             pipeline_dir=None if pipeline_dir is None else str(pipeline_dir))
        self.cond_shape = (L, D)
        self.pipeline_dir = self.init_kwargs["pipeline_dir"]
        self.register_buffer("uncond", torch.zeros(1, L, D))

    def condition(self, cond: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
        """The [n, L, D] float32 condition of a batch of n: `cond` (batch n or 1), or `uncond` for None."""
        cond = self.uncond if cond is None else torch.as_tensor(cond)
        cond = cond.to(device, torch.float32)
        if cond.ndim != 3 or tuple(cond.shape[1:]) != self.cond_shape or cond.shape[0] not in (1, n):
            raise ValueError(f"the condition must be prompt embeddings of shape [{n}, {self.cond_shape[0]}, "
                             f"{self.cond_shape[1]}] (or [1, ...]), got {list(cond.shape)}: encode the prompts with "
                             f"sida.io.text_encoder.TextEncoder")
        return cond.expand(n, -1, -1)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, augment_labels: Optional[torch.Tensor] = None,
                return_flag: str = "decoder", decode_first: Optional[int] = None) -> Output:
        x, sigma, _, dtype = self._prepare(x, sigma, None, force_fp32)
        cond = self.condition(class_labels, x.shape[0], x.device)
        return self._run(x, sigma, cond, dtype, *self.coefficients(sigma), None, return_flag, decode_first)
