"""Preconditioners wrapping the raw UNets into denoisers D(x; sigma) (EDM, Karras et al. 2022, Table 1).

Every preconditioner computes
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
with the underlying UNet F at attribute ``model`` (so state-dict keys are ``model.*`` exactly as in
EDM's published pickles). ``return_flag`` ('decoder' | 'encoder' | 'encoder_decoder') is passed to
the UNet; the 'encoder' logits are returned as the UNet produces them (float32), not preconditioned.

'encoder_features' returns the UNet's list of per-level encoder features (float32, raw UNet
activations of the input c_in(sigma) x at noise label c_noise(sigma)).

``init_kwargs`` holds every constructor argument (JSON-serialisable plain types), so a network can
be rebuilt with ``type(net)(**net.init_kwargs)`` / ``PRECOND_CLASSES[name](**init_kwargs)``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from . import networks
from .edm2 import EDM2UNet, MPConv, MPFourier

__all__ = ["EDMPrecond", "VPPrecond", "VEPrecond", "EDM2Precond", "PRECOND_CLASSES", "round_sigma", "build_model"]

Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], List[torch.Tensor]]


def round_sigma(sigma: Any) -> torch.Tensor:
    """Identity rounding (continuous-sigma preconditioners): returns ``torch.as_tensor(sigma)``."""
    return torch.as_tensor(sigma)


def _plain(v: Any) -> Any:
    """Convert tuples / numpy scalars to JSON-friendly Python types (lists, int, float)."""
    if isinstance(v, (list, tuple)):
        return [_plain(u) for u in v]
    if isinstance(v, dict):
        return {k: _plain(u) for k, u in v.items()}
    if hasattr(v, "item") and not isinstance(v, torch.Tensor):
        return v.item()
    return v


def build_model(model_type: str, **kwargs: Any) -> torch.nn.Module:
    """Instantiate a UNet class from ``sida.nets.networks`` by name ('SongUNet' or 'DhariwalUNet')."""
    if model_type not in networks.__all__ or model_type == "RETURN_FLAGS":
        raise ValueError(f"Unknown model_type {model_type!r}; expected 'SongUNet' or 'DhariwalUNet'")
    return getattr(networks, model_type)(**kwargs)


class _Precond(torch.nn.Module):
    """Shared plumbing: input casting, sigma broadcasting, fp16 switch, model call."""

    def _setup(self, init_kwargs: Dict[str, Any], img_resolution: int, img_channels: int, label_dim: int,
               use_fp16: bool, model_type: str, model_kwargs: Dict[str, Any]) -> None:
        self.init_kwargs = _plain(dict(init_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model_type = model_type
        self.model = build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                 out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    @property
    def augment_dim(self) -> int:
        """Dimensionality of the augmentation-label embedding of the wrapped UNet (0 = none)."""
        return int(getattr(self.model, "augment_dim", 0))

    def _prepare(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor],
                 force_fp32: bool):
        x = x.to(torch.float32)
        # sigma: scalar, [B] or [B,1,1,1] -> [B,1,1,1] (scalars broadcast to the batch).
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([x.shape[0], self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels, self.unet_dtype(x.device, force_fp32)

    # Runtime choice of the UNet's dtype, not part of init_kwargs: a training loop sets it to
    # run EDM's fp16 path on any device (sida.train.nets.apply_precision).
    compute_dtype: Optional[torch.dtype] = None

    def unet_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """The dtype the UNet runs in. EDM's `use_fp16` rule: fp16 on CUDA, fp32 elsewhere (under
        torch.autocast the input stays fp32 and autocast picks the op dtypes); `compute_dtype`,
        when set, overrides it on every device. Weights stay fp32 (each layer casts them), the
        noise/label embedding runs in fp32, and the output is cast back to fp32."""
        if force_fp32:
            return torch.float32
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float16 if (self.use_fp16 and device.type == "cuda") else torch.float32

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor], dtype: torch.dtype,
             c_skip, c_out, c_in, c_noise, augment_labels: Optional[torch.Tensor], return_flag: str,
             decode_first: Optional[int] = None) -> Output:
        # decode_first only when used: wrapped models without it keep working.
        extra = {} if decode_first is None else {"decode_first": decode_first}
        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels,
                         augment_labels=augment_labels, return_flag=return_flag, **extra)
        if return_flag == "encoder":
            return out.to(torch.float32)
        if return_flag == "encoder_features":
            return [f.to(torch.float32) for f in out]
        F_x, logits = (out, None) if return_flag == "decoder" else out
        if decode_first is not None:  # the decoder ran on the first samples only
            x, c_skip, c_out = (t[:decode_first] if torch.is_tensor(t) and t.ndim else t for t in (x, c_skip, c_out))
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x if logits is None else (D_x, logits.to(torch.float32))

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        return round_sigma(sigma)


class EDMPrecond(_Precond):
    """EDM preconditioning: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd / sqrt(sigma^2+sd^2),
    c_in = 1/sqrt(sd^2+sigma^2), c_noise = ln(sigma)/4 (sd = sigma_data)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs: Any):
        super().__init__()
        self._setup(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                         model_type=model_type, **model_kwargs),
                    img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for a sigma tensor (EDM Table 1, 'Ours')."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, augment_labels: Optional[torch.Tensor] = None,
                return_flag: str = "decoder", decode_first: Optional[int] = None) -> Output:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        return self._run(x, sigma, class_labels, dtype, *self.coefficients(sigma), augment_labels, return_flag,
                         decode_first)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021 via EDM): c_skip = 1, c_out = -sigma,
    c_in = 1/sqrt(sigma^2+1), c_noise = (M-1) sigma^{-1}(sigma), with
    sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs: Any):
        super().__init__()
        self._setup(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         use_fp16=use_fp16, beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t,
                         model_type=model_type, **model_kwargs),
                    img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t: Any) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, augment_labels: Optional[torch.Tensor] = None,
                return_flag: str = "decoder", decode_first: Optional[int] = None) -> Output:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_skip, c_out = 1, -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return self._run(x, sigma, class_labels, dtype, c_skip, c_out, c_in, c_noise, augment_labels, return_flag,
                         decode_first)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 **model_kwargs: Any):
        super().__init__()
        self._setup(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                         model_type=model_type, **model_kwargs),
                    img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, augment_labels: Optional[torch.Tensor] = None,
                return_flag: str = "decoder", decode_first: Optional[int] = None) -> Output:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_noise = (0.5 * sigma).log()
        return self._run(x, sigma, class_labels, dtype, 1, sigma, 1, c_noise, augment_labels, return_flag,
                         decode_first)


class EDM2Precond(_Precond):
    """EDM2's preconditioner (Karras et al. 2024): EDM's coefficients (sigma_data 0.5) around
    `sida.nets.edm2.EDM2UNet` at attribute ``unet`` (the release's name), with the learned
    uncertainty head u(sigma) = logvar_linear(logvar_fourier(c_noise)) (EDM2 eq. 21) at
    ``logvar_fourier`` / ``logvar_linear`` when ``logvar`` is True (the published teachers have
    it; the SiDA authors' one-step generators do not). The UNet runs in fp16 on CUDA when use_fp16.

    ``forward(..., return_logvar=True)`` appends the [B,1,1,1] logvar to what ``return_flag``
    asks for.
    """

    augment_dim = 0  # EDM2 has no augmentation embedding
    coefficients = EDMPrecond.coefficients  # c_skip, c_out, c_in, c_noise = ln(sigma)/4

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, logvar: bool = True,
                 **unet_kwargs: Any):
        super().__init__()
        self.init_kwargs = _plain(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                       use_fp16=use_fp16, sigma_data=sigma_data, logvar_channels=logvar_channels,
                                       logvar=logvar, **unet_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.sigma_min = 0
        self.sigma_max = float("inf")
        self.model_type = "EDM2UNet"
        self.has_logvar = bool(logvar)
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             **unet_kwargs)
        if self.has_logvar:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def model(self) -> torch.nn.Module:
        """The UNet under the name the shared preconditioning code calls (registered as `unet`)."""
        return self.unet

    def logvar(self, sigma: Any) -> torch.Tensor:
        """u(sigma) as [B,1,1,1] float32 (a function of sigma only)."""
        if not self.has_logvar:
            raise ValueError("this EDM2Precond was built with logvar=False (no uncertainty head)")
        sigma = torch.as_tensor(sigma, device=self.logvar_linear.weight.device).to(torch.float32).reshape(-1)
        return self.logvar_linear(self.logvar_fourier(sigma.log() / 4)).reshape(-1, 1, 1, 1).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, augment_labels: Optional[torch.Tensor] = None,
                return_flag: str = "decoder", decode_first: Optional[int] = None,
                return_logvar: bool = False) -> Any:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        out = self._run(x, sigma, class_labels, dtype, *self.coefficients(sigma), None, return_flag, decode_first)
        if not return_logvar:
            return out
        lv = self.logvar(sigma)
        return (*out, lv) if isinstance(out, tuple) else (out, lv)


# EDM2Precond wraps its own UNet at attribute `unet`, as EDM2's release does.
PRECOND_CLASSES = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
                   "EDM2Precond": EDM2Precond}
