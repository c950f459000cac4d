"""Drawing samples from networks: one-step / few-step generators and multi-step (Heun) teachers,
for sample grids, sample sets and evaluation.

A distilled generator's network file records its generation sigmas (`gen_sigmas`: one for the
SiD family and DMD2, ADD's student levels for ADD); `generator_sample` draws in k of them.
`sampler_fn` is the one place that picks the sampler (generator sigmas or Heun steps);
`make_generate` and `sample_grid` wire it to an experiment's config as evaluation samples it.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..nets.sampler import few_step_generate, heun_sampler, one_step_generate, sampling_sigmas

__all__ = ["GenerateFn", "grid_labels", "generator_sigmas", "latent_noise", "generator_sample", "sampler_fn",
           "generator_fn", "sample", "grid_samples", "make_generate", "decode_fn", "check_network", "sample_grid"]

# generate(z [B, C, H, W], one-hot labels [B, label_dim] | None) -> images (or latents)
GenerateFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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


def sampler_fn(net: torch.nn.Module, steps: int, sigmas: Sequence[float] | None) -> GenerateFn:
    """generate(z, labels) of a distilled generator at `sigmas`, or (sigmas None) of EDM's Heun
    sampler in `steps` steps (2*steps - 1 NFE, a teacher)."""
    if sigmas is not None:
        return lambda z, labels: generator_sample(net, z, labels, sigmas)
    return lambda z, labels: heun_sampler(net, z, labels, num_steps=steps)


def generator_fn(net: torch.nn.Module, steps: int = 1, default_sigma: float = 2.5) -> GenerateFn:
    """generate(z, labels) for a distilled generator in `steps` steps (its recorded sigmas)."""
    return sampler_fn(net, steps, sampling_sigmas(generator_sigmas(net, default_sigma), steps))


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
    fn = sampler_fn(net, steps, sigmas)
    return torch.cat([fn(z[i:i + batch], labels[i:i + batch]) for i in range(0, z.shape[0], batch)])


@torch.no_grad()
def grid_samples(net: torch.nn.Module, cols: int, seed: int, steps: int = 1, sigma_init: float = 2.5,
                 decode: Callable | None = None, sigmas: Sequence[float] | None = None,
                 prompts: Callable | None = None) -> torch.Tensor:
    """Grid samples from a fixed seed (comparable across snapshots and runs), row by row with
    `cols` columns: one row per class for a class-conditional net (or per class prompt of a text
    net: `prompts`, `sida.eval.prompting.ClassPrompts`), else cols rows; `decode` and `sigmas` (a
    distilled generator's generation sigmas) as in `sample`."""
    device = next(net.parameters()).device
    classes = len(prompts.prompts) if prompts is not None else net.label_dim
    rows = classes or cols
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    z = torch.randn([rows * cols, net.img_channels, net.img_resolution, net.img_resolution], generator=g, device=device)
    labels = grid_labels(rows, cols, classes, device)
    return sample(net, z, labels if prompts is None else prompts(labels), steps=steps, sigma_init=sigma_init,
                  decode=decode, sigmas=sigmas)


def make_generate(net: torch.nn.Module, kind: str, cfg: dict, decode: Callable | None = None,
                  steps: int = 1) -> tuple[GenerateFn, int]:
    """(generate(z, labels) -> images in [-1, 1], NFE) for a distilled generator in `steps` steps
    at the generation sigmas its network file records (SiD family 2.5, DMD2 80, ADD its student
    levels), or the Heun teacher. `decode` (latent-space configs: `LatentDecoder.unit`) turns the
    network's latents into images."""
    if kind == "generator":
        fn, nfe = generator_fn(net, steps, float(cfg["distill"]["sigma_init"])), steps
    elif kind == "teacher":
        steps = int(cfg["evaluate"]["teacher_steps"])
        fn, nfe = sampler_fn(net, steps, None), 2 * steps - 1
    else:
        raise ValueError(f"unknown kind {kind!r} (generator or teacher)")
    return (fn if decode is None else (lambda z, c: decode(fn(z, c)))), nfe


def decode_fn(cfg: dict, device: torch.device | str) -> Callable | None:
    """The VAE decoding of latent-space configs (None in pixel space)."""
    from ..io.latents import decoder_from_config

    decoder = decoder_from_config(cfg, device)
    return None if decoder is None else decoder.unit


def check_network(net: torch.nn.Module, cfg: dict, path: str) -> tuple[int, int, int]:
    """(resolution, channels, label_dim) of `net`, which must make the config's data (a network
    evaluated with another experiment's config would be scored against the wrong reference)."""
    d = cfg["data"]
    res, ch, ld = int(net.img_resolution), int(net.img_channels), int(net.label_dim)
    if (res, ch) != (d["resolution"], d["channels"]):
        raise DataError(f"network {path} makes {res}x{res}x{ch} images but the config's data is "
                        f"{d['resolution']}x{d['resolution']}x{d['channels']}: evaluate it with its own config")
    if ld != d["label_dim"]:
        raise DataError(f"network {path} has label_dim {ld} but the config's data has {d['label_dim']}: "
                        f"evaluate it with its own config")
    return res, ch, ld


def sample_grid(net: torch.nn.Module, kind: str, cfg: dict, decode: Callable | None = None,
                sigmas: Sequence[float] | None = None, prompts: Callable | None = None) -> torch.Tensor:
    """The evaluation's sample grid in [-1, 1]: `grid_size` columns, one row per class (class-
    conditional) or grid_size rows; the same latents for every model of the experiment.
    `decode` as in `make_generate` (latent-space networks); `sigmas`: a generator's generation
    sigmas as evaluated (default: one step at distill.sigma_init)."""
    ev = cfg["evaluate"]
    steps = ev["teacher_steps"] if kind == "teacher" else 1
    return grid_samples(net, ev["grid_size"], ev["seed"], steps=steps, sigma_init=cfg["distill"]["sigma_init"],
                        decode=decode, sigmas=sigmas if kind == "generator" else None, prompts=prompts)

