"""Samplers and noise-level schedules.

- ``heun_sampler``: EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 2); deterministic
  when S_churn = 0. With num_steps N it costs 2N - 1 network evaluations (18 steps = 35 NFE).
- ``one_step_generate``: the SiD one-step generator convention x_g = G(sigma_init z, sigma_init).
- ``sid_sigma_t``: the Karras-schedule noise level at continuous t used by the SiD generator loss.
- ``sample_sigma_lognormal``: EDM's training noise distribution ln(sigma) ~ N(P_mean, P_std^2).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

__all__ = ["karras_sigmas", "heun_sampler", "one_step_generate", "sid_sigma_t", "sample_sigma_lognormal"]


def karras_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device: Optional[torch.device] = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM time steps t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..N-1, followed by t_N = 0 (length N + 1)."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    denom = max(num_steps - 1, 1)  # N = 1: a single Euler step from sigma_max to 0
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def _unwrap(net: Any) -> Any:
    """Strip DDP / compile wrappers (``.module``, ``._orig_mod``) to reach the preconditioner."""
    for attr in ("module", "_orig_mod"):
        while hasattr(net, attr) and isinstance(getattr(net, attr), torch.nn.Module):
            net = getattr(net, attr)
    return net


@torch.no_grad()
def heun_sampler(net: Callable[..., torch.Tensor], latents: torch.Tensor,
                 class_labels: Optional[torch.Tensor] = None, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0, S_min: float = 0,
                 S_max: float = float("inf"), S_noise: float = 1,
                 randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
    """EDM's Heun sampler (Algorithm 2 of Karras et al. 2022) on the probability-flow ODE
    dx/dsigma = (x - D(x; sigma)) / sigma.

    ``net(x, sigma, class_labels)`` is a denoiser (e.g. an ``EDMPrecond``, or any callable); its
    ``sigma_min``/``sigma_max``/``round_sigma`` attributes are honoured when present. ``latents``
    are N(0, I) draws; the chain starts at x_0 = sigma_max * latents and is integrated in float64
    (as EDM does) to t_N = 0. Returns the final sample in float32.
    """
    base = _unwrap(net)
    sigma_min = max(sigma_min, float(getattr(base, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(base, "sigma_max", float("inf"))))
    rnd = getattr(base, "round_sigma", lambda s: torch.as_tensor(s))
    B = latents.shape[0]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Pass sigma as a [B] float32 vector (accepted by every preconditioner).
        s = t.to(torch.float32).expand(B).to(x.device)
        return net(x.to(torch.float32), s, class_labels).to(torch.float64)

    t_steps = rnd(karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device))
    t_steps = torch.as_tensor(t_steps, dtype=torch.float64, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        # Optional stochastic churn: raise the noise level to t_hat = (1 + gamma) t_cur.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = torch.as_tensor(rnd(t_cur + gamma * t_cur), dtype=torch.float64, device=latents.device)
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # 2nd-order (trapezoidal) correction, skipped on the last step where t_next = 0.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)


def one_step_generate(G: Callable[..., torch.Tensor], z: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                      sigma_init: float = 2.5) -> torch.Tensor:
    """SiD one-step generation: x_g = G(sigma_init * z, sigma_init * 1_B, class_labels, augment_labels=0).

    The generator is a denoiser (initialised from the teacher) evaluated at the fixed noise level
    sigma_init on the scaled noise; augment labels are zeros (no augmentation at generation).
    Gradients flow (no ``no_grad``) since this is also the training forward of G.
    """
    B = z.shape[0]
    sigma = torch.full([B], float(sigma_init), device=z.device, dtype=torch.float32)
    augment_dim = int(getattr(_unwrap(G), "augment_dim", 0) or 0)
    augment_labels = torch.zeros([B, augment_dim], device=z.device) if augment_dim else None
    return G(sigma_init * z, sigma, class_labels, augment_labels=augment_labels)


def sid_sigma_t(t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """sigma_t = (sigma_max^(1/rho) + (1 - t)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    t = 1 gives sigma_max, t = 0 gives sigma_min (the Karras schedule read with continuous t; SiD
    draws t ~ U[0, tmax/1000]). Shape and dtype follow ``t``.
    """
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - t) * (b - a)) ** rho


def sample_sigma_lognormal(n: int, P_mean: float = -1.2, P_std: float = 1.2,
                           generator: Optional[torch.Generator] = None,
                           device: Optional[torch.device] = None) -> torch.Tensor:
    """EDM training noise levels: sigma = exp(P_mean + P_std * N(0, 1)).

    Returns float32 of shape [n, 1, 1, 1] so it broadcasts against [n, C, H, W] images.
    """
    if generator is not None and device is None:
        device = generator.device
    rnd = torch.randn([n, 1, 1, 1], generator=generator, device=device, dtype=torch.float32)
    return (rnd * P_std + P_mean).exp()
