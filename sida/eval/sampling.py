"""Drawing sample grids and sample sets from networks (one-step generators or multi-step teachers)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..nets.sampler import heun_sampler, one_step_generate


def grid_labels(n: int, label_dim: int, device: torch.device) -> torch.Tensor:
    """One-hot labels cycling through the classes (a grid row shows every class); [n,0] if none."""
    if label_dim == 0:
        return torch.zeros([n, 0], device=device)
    return F.one_hot(torch.arange(n, device=device) % label_dim, label_dim).float()


@torch.no_grad()
def sample(net: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor, steps: int = 1,
           sigma_init: float = 2.5, batch: int = 256, decode: Callable | None = None) -> torch.Tensor:
    """Images in [-1, 1] from latents `z` ~ N(0, I): one step at sigma_init (steps == 1, a
    distilled generator) or EDM's Heun sampler with `steps` steps (2*steps - 1 NFE, a teacher).
    With `decode` (latent-space networks: `sida.io.latents.LatentDecoder.unit`) the network's
    output is decoded to images first, unclamped (latents are not confined to [-1, 1])."""
    if decode is not None:
        return decode(_sample(net, z, labels, steps, sigma_init, batch))
    return _sample(net, z, labels, steps, sigma_init, batch).clamp(-1, 1)


def _sample(net, z, labels, steps, sigma_init, batch) -> torch.Tensor:
    out = []
    for i in range(0, z.shape[0], batch):
        zi, li = z[i:i + batch], labels[i:i + batch]
        if steps == 1:
            out.append(one_step_generate(net, zi, li, sigma_init=sigma_init))
        else:
            out.append(heun_sampler(net, zi, li, num_steps=steps))
    return torch.cat(out)


@torch.no_grad()
def grid_samples(net: torch.nn.Module, cols: int, seed: int, steps: int = 1, sigma_init: float = 2.5,
                 decode: Callable | None = None) -> torch.Tensor:
    """A cols x cols grid of samples from a fixed seed (comparable across snapshots and runs);
    `decode` as in `sample`."""
    device = next(net.parameters()).device
    n = cols * cols
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    z = torch.randn([n, net.img_channels, net.img_resolution, net.img_resolution], generator=g, device=device)
    return sample(net, z, grid_labels(n, net.label_dim, device), steps=steps, sigma_init=sigma_init, decode=decode)
