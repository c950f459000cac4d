"""Drawing sample grids and sample sets from networks (one-step / few-step generators or
multi-step teachers).

A distilled generator's network file records its generation sigmas (`gen_sigmas`: one for the
SiD family and DMD2, ADD's student levels for ADD); `generator_sample` draws in k of them.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..nets.sampler import few_step_generate, heun_sampler, one_step_generate, sampling_sigmas


def grid_labels(rows: int, cols: int, label_dim: int, device: torch.device) -> torch.Tensor:
    """One-hot labels of a rows x cols grid filled row by row: row r shows class r mod
    label_dim (one row per class when rows == label_dim); [n, 0] when unconditional."""
    n = rows * cols
    if label_dim == 0:
        return torch.zeros([n, 0], device=device)
    return F.one_hot((torch.arange(n, device=device) // cols) % label_dim, label_dim).float()


def generator_sigmas(net: torch.nn.Module, default_sigma: float = 2.5) -> list[float]:
    """The generation sigmas recorded in a generator's network file (largest first); files
    without them: [their sigma_init], else [default_sigma]."""
    meta = getattr(net, "sida_meta", None) or {}
    sigmas = meta.get("gen_sigmas") or [meta.get("sigma_init", default_sigma)]
    return [float(s) for s in sigmas]


def latent_noise(z: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` noise tensors shaped like z for few-step sampling's re-noising. Sample i's come from
    a generator seeded by the bytes of its own latent z_i (itself drawn from the sample's seed), so
    a sample does not depend on its batch, the batch size or the process count."""
    if count == 0:
        return []
    zc = z.detach().to(torch.float32).cpu().contiguous()
    out = torch.empty([count, *z.shape])
    for i in range(z.shape[0]):
        seed = int.from_bytes(hashlib.sha256(zc[i].numpy().tobytes()).digest()[:8], "little") >> 1
        out[:, i] = torch.randn([count, *z.shape[1:]], generator=torch.Generator().manual_seed(seed))
    return list(out.to(z.device))


def generator_sample(net: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None,
                     sigmas: Sequence[float]) -> torch.Tensor:
    """A distilled generator's samples in len(sigmas) steps (one step: G(sigma z, sigma))."""
    if len(sigmas) == 1:
        return one_step_generate(net, z, labels, sigma_init=float(sigmas[0]))
    return few_step_generate(net, z, sigmas, labels, noise=latent_noise(z, len(sigmas) - 1))


def generator_fn(net: torch.nn.Module, steps: int = 1, default_sigma: float = 2.5
                 ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """generate(z, labels) for a distilled generator in `steps` steps (its recorded sigmas)."""
    sigmas = sampling_sigmas(generator_sigmas(net, default_sigma), steps)
    return lambda z, labels: generator_sample(net, z, labels, sigmas)


@torch.no_grad()
def sample(net: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor, steps: int = 1,
           sigma_init: float = 2.5, batch: int = 256, decode: Callable | None = None,
           sigmas: Sequence[float] | None = None) -> torch.Tensor:
    """Images in [-1, 1] from latents `z` ~ N(0, I): a distilled generator in len(`sigmas`) steps
    when `sigmas` are given, else one step at sigma_init (steps == 1) or EDM's Heun sampler with
    `steps` steps (2*steps - 1 NFE, a teacher). With `decode` (latent-space networks:
    `sida.io.latents.LatentDecoder.unit`) the network's output is decoded to images first,
    unclamped (latents are not confined to [-1, 1])."""
    if sigmas is None and steps == 1:
        sigmas = [sigma_init]
    if decode is not None:
        return decode(_sample(net, z, labels, steps, sigmas, batch))
    return _sample(net, z, labels, steps, sigmas, batch).clamp(-1, 1)


def _sample(net, z, labels, steps, sigmas, batch) -> torch.Tensor:
    out = []
    for i in range(0, z.shape[0], batch):
        zi, li = z[i:i + batch], labels[i:i + batch]
        if sigmas is not None:
            out.append(generator_sample(net, zi, li, sigmas))
        else:
            out.append(heun_sampler(net, zi, li, num_steps=steps))
    return torch.cat(out)


@torch.no_grad()
def grid_samples(net: torch.nn.Module, cols: int, seed: int, steps: int = 1, sigma_init: float = 2.5,
                 decode: Callable | None = None, sigmas: Sequence[float] | None = None) -> torch.Tensor:
    """Grid samples from a fixed seed (comparable across snapshots and runs), row by row with
    `cols` columns: one row per class for a class-conditional net, else cols rows; `decode` and
    `sigmas` (a distilled generator's generation sigmas) as in `sample`."""
    device = next(net.parameters()).device
    rows = net.label_dim or cols
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    z = torch.randn([rows * cols, net.img_channels, net.img_resolution, net.img_resolution], generator=g, device=device)
    return sample(net, z, grid_labels(rows, cols, net.label_dim, device), steps=steps, sigma_init=sigma_init, decode=decode,
                  sigmas=sigmas)
