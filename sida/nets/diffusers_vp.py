"""A diffusers pixel-space `UNet2DModel` with its variance-preserving scheduler as an EDM denoiser.

Users bring teachers in the diffusers format (a UNet2DModel trained with a DDPM/DDIM scheduler);
the distillation loop speaks EDM: D(x; sigma) on x = x0 + sigma n. The published VP <-> EDM
correspondence (Karras et al. 2022, Table 1 'VP'; Song et al. 2021) maps one onto the other:

- noise level of discrete step k: sigma_k = sqrt((1 - abar_k) / abar_k) (abar = alphas_cumprod);
- the UNet sees the VP input x_vp = x / sqrt(1 + sigma^2) = alpha x0 + s n, with
  alpha = 1 / sqrt(1 + sigma^2), s = sigma / sqrt(1 + sigma^2);
- continuous sigma -> fractional timestep t(sigma) (EDM's VPPrecond feeds (M-1) sigma^-1(sigma)
  the same way): sigma is clamped to [sigma_0, sigma_{N-1}] and t is linear in log sigma between
  the two neighbouring entries of the table, t = k + (ln sigma - ln sigma_k) / (ln sigma_{k+1} -
  ln sigma_k) (the table is strictly increasing, so t(sigma) is monotone and t(sigma_k) = k);
- the prediction becomes x0, with the *unclamped* sigma (a model error is then scaled the
  way the ODE expects, also outside the table's range):
  epsilon: x0 = x - sigma eps            (c_skip 1,           c_out -sigma)
  v_prediction: x0 = alpha x_vp - s v   (c_skip 1/(1+sigma^2), c_out -sigma/sqrt(1+sigma^2))
  sample: x0 = F                         (c_skip 0,           c_out 1)
The scheduler's clip_sample / thresholding are sampler options, not part of D: not applied.

`sigma_min` / `sigma_max` are the table's ends, so EDM's Heun sampler stays inside the range the
scheduler covers. Class labels: the pipeline's one-hot (or soft) vectors are multiplied into
the UNet's `class_embedding` table, which equals its lookup for one-hot labels.

The encoder of SiDA's discriminator is the down path and the mid block: 'encoder' logits are the
channel mean of the mid-block output (the convention of `sida.nets.networks`); 'encoder_features'
are the outputs of each down block, then the mid block's (the bottleneck last).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from .networks import RETURN_FLAGS
from .precond import Output, _plain, _Precond

__all__ = ["DiffusersVPPrecond", "PREDICTION_TYPES", "vp_sigmas"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def vp_sigmas(alphas_cumprod: Sequence[float]) -> torch.Tensor:
    """sigma_k = sqrt((1 - abar_k) / abar_k) of a scheduler's alphas_cumprod (float64)."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


class _UNetAdapter(torch.nn.Module):
    """A diffusers UNet behind the call of our UNets: (x, noise_labels, class_labels, augment_labels,
    return_flag, decode_first). It runs the model's own blocks in the order of its `forward`
    (which returns only the output) so that the mid-block activations can be returned too.

    This class adapts a UNet2DModel (class labels multiplied into its class embedding); the text
    adapter (`sida.nets.diffusers_text`) overrides `_build` and `_condition` and passes the prompt
    embedding as `context` to the blocks with cross-attention."""

    def __init__(self, config: Dict[str, Any]) -> None:
        super().__init__()
        self.unet = self._build(config)

    @staticmethod
    def _build(config: Dict[str, Any]) -> torch.nn.Module:
        from diffusers import UNet2DModel  # late: importing diffusers costs seconds

        return UNet2DModel(**config)

    def _embed(self, x: torch.Tensor, noise_labels: torch.Tensor, labels: Optional[torch.Tensor]):
        """(the UNet's input, its embedding of time and labels, the cross-attention context or None)."""
        u = self.unet
        if u.config.center_input_sample:
            x = 2 * x - 1.0
        emb = u.time_embedding(u.time_proj(noise_labels.to(torch.float32)).to(x.dtype))
        return (x, *self._condition(emb, labels))

    def _condition(self, emb: torch.Tensor, class_labels: Optional[torch.Tensor]):
        """(embedding, context): one-hot labels multiplied into the class embedding table; no context."""
        u = self.unet
        if u.class_embedding is not None:
            emb = emb + (class_labels.to(u.class_embedding.weight.dtype) @ u.class_embedding.weight).to(emb.dtype)
        return emb, None

    @staticmethod
    def _cross(block: torch.nn.Module, context: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The prompt embedding for blocks with cross-attention (diffusers' own test)."""
        return {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None, return_flag: str = "decoder",
                decode_first: Optional[int] = None) -> Output:
        if return_flag not in RETURN_FLAGS:
            raise ValueError(f"return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}")
        u = self.unet
        x, emb, context = self._embed(x, noise_labels, class_labels)
        skip_sample, h = x, u.conv_in(x)
        res, feats = [h], []
        for block in u.down_blocks:
            if hasattr(block, "skip_conv"):
                h, r, skip_sample = block(hidden_states=h, temb=emb, skip_sample=skip_sample)
            else:
                h, r = block(hidden_states=h, temb=emb, **self._cross(block, context))
            res += list(r)
            feats.append(h)
        if u.mid_block is not None:
            h = u.mid_block(h, emb, **self._cross(u.mid_block, context))
        feats.append(h)
        if return_flag == "encoder_features":
            return feats
        logits = h.mean(dim=1, keepdim=True)
        if return_flag == "encoder":
            return logits
        if decode_first is not None:  # SiDA: real images go through the encoder only
            h, emb, res = h[:decode_first], emb[:decode_first], [r[:decode_first] for r in res]
            context = None if context is None else context[:decode_first]
        skip_sample = None
        for block in u.up_blocks:
            r, res = tuple(res[-len(block.resnets):]), res[:-len(block.resnets)]
            if hasattr(block, "skip_conv"):
                h, skip_sample = block(h, r, emb, skip_sample)
            else:
                h = block(h, r, emb, **self._cross(block, context))
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        h = u.conv_out(h)
        if skip_sample is not None:
            h = h + skip_sample
        return h if return_flag == "decoder" else (h, logits)


class _DiffusersPrecond(_Precond):
    """What the diffusers wrappers share: the VP sigma table of the scheduler's alphas_cumprod,
    the fractional timestep, the prediction type's c_skip / c_out and c_in = 1/sqrt(1+sigma^2)
    (see the module docstring). Subclasses name their adapter and call `_init_diffusers`."""

    augment_dim = 0  # diffusers UNets have no augmentation embedding
    adapter = _UNetAdapter

    def _init_diffusers(self, unet_config: Dict[str, Any], alphas_cumprod: Sequence[float], prediction_type: str,
                        img_resolution: Optional[int], img_channels: Optional[int], label_dim: int, use_fp16: bool,
                        dropout: Optional[float], **extra: Any) -> None:
        """Validate, record `init_kwargs` (with the subclass's `extra` arguments) and build the UNet."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        config = dict(unet_config)
        if dropout is not None:
            config["dropout"] = float(dropout)
        size = config.get("sample_size")
        img_resolution = int(img_resolution or (size[0] if isinstance(size, (list, tuple)) else size))
        img_channels = int(img_channels or config.get("in_channels", 3))
        self.init_kwargs = _plain(dict(unet_config=config, alphas_cumprod=[float(a) for a in alphas_cumprod],
                                       prediction_type=prediction_type, img_resolution=img_resolution,
                                       img_channels=img_channels, label_dim=label_dim, use_fp16=use_fp16,
                                       dropout=config.get("dropout", 0.0), **extra))
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, int(label_dim)
        self.use_fp16 = use_fp16
        self.prediction_type = prediction_type
        self.model = self.adapter(config)
        self.model_type = type(self.model.unet).__name__
        sig = vp_sigmas(alphas_cumprod)
        if not bool((sig[1:] > sig[:-1]).all()) or not bool(torch.isfinite(sig).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing and positive (finite sigmas)")
        self.register_buffer("log_sigmas", sig.log().to(torch.float32), persistent=False)
        self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])
        self.sigma_data = 0.5

    @property
    def num_train_timesteps(self) -> int:
        return int(self.log_sigmas.shape[0])

    def sigma_at(self, timestep: int) -> float:
        """sigma_k of the discrete table (k an integer training timestep), computed in float64."""
        k = int(timestep)
        if not 0 <= k < self.num_train_timesteps:
            raise ValueError(f"timestep {timestep} is outside the scheduler's 0..{self.num_train_timesteps - 1}")
        return float(vp_sigmas(self.init_kwargs["alphas_cumprod"][k:k + 1])[0])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional scheduler timestep of each sigma: linear in log sigma between the
        neighbouring entries of the table, sigma clamped to its range first (same shape as sigma)."""
        ls = self.log_sigmas.to(sigma.device)
        x = sigma.to(torch.float32).clamp(self.sigma_min, self.sigma_max).log().clamp(ls[0], ls[-1])
        k = (torch.searchsorted(ls, x.reshape(-1).contiguous(), right=True) - 1).clamp(0, ls.shape[0] - 2)
        lo, hi = ls[k], ls[k + 1]
        t = k.to(torch.float32) + (x.reshape(-1) - lo) / (hi - lo)
        return t.reshape(sigma.shape)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise): D = c_skip x + c_out F(c_in x; t(sigma))."""
        c_in = 1 / (1 + sigma ** 2).sqrt()
        if self.prediction_type == "epsilon":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction_type == "v_prediction":
            c_skip, c_out = c_in ** 2, -sigma * c_in
        else:
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        return c_skip, c_out, c_in, self.timestep(sigma)

    def unet_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """Always fp32: diffusers layers do not cast their fp32 weights to an fp16 input the way
        EDM's layers do (precision bf16 still works through torch.autocast)."""
        return torch.float32

    def one_step_timestep(self, sigma_init: float) -> float:
        """The scheduler timestep at which one-step generation evaluates the UNet."""
        return float(self.timestep(torch.tensor([float(sigma_init)])))


class DiffusersVPPrecond(_DiffusersPrecond):
    """EDM denoiser around a diffusers UNet2DModel trained with a VP (DDPM/DDIM) schedule.

    Rebuildable from `init_kwargs` like every network of ours: `unet_config` (the UNet's
    config.json without diffusers' private keys), `alphas_cumprod` of the scheduler and its
    `prediction_type`; `dropout` overrides the UNet's rate (the generator and fake score may
    train with another rate than the teacher, see `clone_with_dropout`).
    """

    def __init__(self, unet_config: Dict[str, Any], alphas_cumprod: Sequence[float],
                 prediction_type: str = "epsilon", img_resolution: Optional[int] = None,
                 img_channels: Optional[int] = None, label_dim: int = 0, use_fp16: bool = False,
                 dropout: Optional[float] = None) -> None:
        super().__init__()
        self._init_diffusers(unet_config, alphas_cumprod, prediction_type, img_resolution, img_channels, label_dim,
                             use_fp16, dropout)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, augment_labels: Optional[torch.Tensor] = None,
                return_flag: str = "decoder", decode_first: Optional[int] = None) -> Output:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        return self._run(x, sigma, class_labels, dtype, *self.coefficients(sigma), None, return_flag, decode_first)


def label_dim_of(unet_config: Dict[str, Any]) -> int:
    """Classes of a UNet2DModel config (num_class_embeds with the default embedding), else 0."""
    n = unet_config.get("num_class_embeds")
    return int(n) if n and unet_config.get("class_embed_type") is None else 0
