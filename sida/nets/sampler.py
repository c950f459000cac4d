"""Samplers and noise-level schedules.

- ``heun_sampler``: EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 2); deterministic
  when S_churn = 0. With num_steps N it costs 2N - 1 network evaluations (18 steps = 35 NFE).
- ``one_step_generate``: the SiD one-step generator convention x_g = G(sigma_init z, sigma_init).
- ``sid_sigma_t``: the Karras-schedule noise level at continuous t used by the SiD generator loss.
- ``sample_sigma_lognormal``: EDM's training noise distribution ln(sigma) ~ N(P_mean, P_std^2).
- ``karras_grid_sigma`` / ``sample_karras_grid_sigma``: the teacher's schedule discretised into
  1000 integer time steps (DMD2's grid; index 0 = sigma_min, 999 = sigma_max), and uniform draws
  of an index range on it (DMD2: 20..980).
- ``add_student_sigmas``: ADD's N = 4 student noise levels, t in {999, 749, 499, 249} on that grid.
- ``few_step_generate``: ADD's 1-4 step sampling (denoise, re-noise with fresh noise at the next
  student level, denoise again).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["karras_sigmas", "heun_sampler", "one_step_generate", "sid_sigma_t", "sample_sigma_lognormal",
           "karras_grid_sigma", "sample_karras_grid_sigma", "add_student_sigmas", "few_step_generate",
           "sampling_sigmas",
           "GRID_STEPS", "DMD2_INDEX_RANGE", "ADD_STUDENT_STEPS"]


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
    return _denoise_at(G, sigma_init * z, float(sigma_init), class_labels)


def _denoise_at(G: Callable[..., torch.Tensor], x: torch.Tensor, sigma: float,
                class_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """G(x, sigma 1_B, class_labels) with zero augment labels (none at generation time)."""
    B = x.shape[0]
    sig = torch.full([B], sigma, device=x.device, dtype=torch.float32)
    augment_dim = int(getattr(_unwrap(G), "augment_dim", 0) or 0)
    augment_labels = torch.zeros([B, augment_dim], device=x.device) if augment_dim else None
    return G(x, sig, class_labels, augment_labels=augment_labels)


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
    return lognormal_sigma(torch.randn([n, 1, 1, 1], generator=generator, device=device, dtype=torch.float32),
                           P_mean, P_std)


def lognormal_sigma(normal: torch.Tensor, P_mean: float, P_std: float) -> torch.Tensor:
    """exp(P_mean + P_std * normal) of standard normal draws `normal`: EDM's training noise levels."""
    return (normal * P_std + P_mean).exp()


# The teacher's schedule as 1000 integer time steps. DMD2 (main/edm/edm_guidance.py) builds
# k-diffusion's Karras sigmas from sigma_max down to sigma_min and flips them so that index 0 is
# sigma_min and index 999 is sigma_max ("small sigma first"); index i is then the continuous
# schedule above at t = i / 999. DDPM-style step numbers (ADD's t = 999, 749, ...) read on this
# grid keep their meaning: 999 is the noisiest step, where one-step generation starts.
GRID_STEPS = 1000
DMD2_INDEX_RANGE = (20, 980)  # DMD2's min/max_step_percent 0.02 / 0.98 of 1000, both inclusive
ADD_STUDENT_STEPS = (999, 749, 499, 249)  # ADD's N = 4 student steps, evenly spaced from 999


def karras_grid_sigma(index: torch.Tensor | int | Sequence[int], num_steps: int = GRID_STEPS,
                      sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sigma at integer step `index` of the teacher's `num_steps`-point Karras grid, ascending:
    index 0 -> sigma_min, num_steps - 1 -> sigma_max; equal to ``sid_sigma_t(index / (num_steps - 1))``.

    Evaluated in float64 and cast to `dtype` (DMD2 builds its grid in float32, so a value can
    differ from DMD2's in the last float32 bit). Shape and device follow `index`.
    """
    idx = torch.as_tensor(index)
    if idx.is_floating_point():
        raise TypeError("karras_grid_sigma takes integer step indices")
    if int(idx.min()) < 0 or int(idx.max()) > num_steps - 1:
        raise ValueError(f"grid indices must lie in [0, {num_steps - 1}], got {idx.min()}..{idx.max()}")
    return _grid(idx, num_steps, sigma_min, sigma_max, rho).to(dtype)


def _grid(idx: torch.Tensor, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The grid formula on checked indices (no host synchronisation: used in the training loop)."""
    return sid_sigma_t(idx.to(torch.float64) / (num_steps - 1), sigma_min, sigma_max, rho)


def sample_karras_grid_sigma(n: int, lo: int, hi: int, generator: Optional[torch.Generator] = None,
                             device: Optional[torch.device] = None, num_steps: int = GRID_STEPS,
                             sigma_min: float = 0.002, sigma_max: float = 80.0,
                             rho: float = 7.0) -> torch.Tensor:
    """n sigmas drawn uniformly among the grid indices lo..hi (both inclusive), float32 [n,1,1,1].

    DMD2's distribution-matching loss uses lo, hi = 20, 980 (`DMD2_INDEX_RANGE`); its fake-score
    loss and its classifier's input noise use the whole grid, 0, 999. One ``torch.randint`` from
    `generator` (on its device unless `device` is given), so a checkpointed generator replays it.
    """
    if not 0 <= lo <= hi <= num_steps - 1:
        raise ValueError(f"need 0 <= lo <= hi <= {num_steps - 1}, got lo={lo}, hi={hi}")
    if generator is not None and device is None:
        device = generator.device
    idx = torch.randint(lo, hi + 1, [n, 1, 1, 1], generator=generator, device=device)
    return _grid(idx, num_steps, sigma_min, sigma_max, rho).to(torch.float32)


def add_student_sigmas(steps: Sequence[int] = ADD_STUDENT_STEPS, num_steps: int = GRID_STEPS,
                       sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """ADD's student noise levels: the teacher's grid read at `steps`, in the given order.

    With EDM's schedule (0.002, 80, 7): about [80.0, 17.50, 2.504, 0.1681]. The first (largest)
    is the generation sigma: one-step use is x = G(sigma_0 z, sigma_0), as for the SiD family
    with sigma_init. The student trains on real images noised at each of them.
    """
    sig = karras_grid_sigma(list(steps), num_steps, sigma_min, sigma_max, rho, dtype=torch.float64)
    return [float(s) for s in sig]


def few_step_generate(G: Callable[..., torch.Tensor], z: torch.Tensor, sigmas: Sequence[float],
                      class_labels: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None,
                      noise: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """ADD's multi-step sampling: x_0 = G(sigmas[0] z, sigmas[0]); then for each further level s,
    x = G(x + s eps, s) with fresh eps ~ N(0, I): from `noise` (one tensor shaped like z per
    further level) when given, else drawn from `generator`.

    Each step denoises to a clean estimate and re-noises it at the next (smaller) student level,
    so N levels cost N network evaluations; one level is exactly ``one_step_generate``.
    """
    if len(sigmas) == 0:
        raise ValueError("few_step_generate needs at least one noise level")
    if noise is not None and len(noise) != len(sigmas) - 1:
        raise ValueError(f"{len(sigmas)} levels need {len(sigmas) - 1} noise tensors, got {len(noise)}")
    x = one_step_generate(G, z, class_labels, sigma_init=float(sigmas[0]))
    for i, s in enumerate(sigmas[1:]):
        eps = noise[i] if noise is not None else torch.randn(z.shape, generator=generator, device=z.device,
                                                              dtype=z.dtype)
        x = _denoise_at(G, x + float(s) * eps, float(s), class_labels)
    return x


def sampling_sigmas(gen_sigmas: Sequence[float], steps: int) -> list[float]:
    """The levels a k-step sampler visits among a generator's N levels (largest first): evenly
    spaced from the first, indices round(i N / k); k = N visits all, k = 1 the largest only
    (ADD with N = 4: 2 steps = levels 0 and 2)."""
    n = len(gen_sigmas)
    if not 1 <= steps <= n:
        raise ValueError(f"this generator samples in 1 to {n} steps (its noise levels: {list(gen_sigmas)}), not {steps}")
    return [float(gen_sigmas[round(i * n / steps)]) for i in range(steps)]
