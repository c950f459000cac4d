"""Every random draw of a training loop, from per-slot generators whose state is checkpointed.

`make_generators` gives one process one `noise` and one `data` generator per micro-batch slot
(accumulation round r of rank k is global slot k * rounds + r), so a run's draws do not depend on
how its global batch is split over processes and rounds, and a resumed run replays them.
`Draws` is what the distillation methods (`sida.train.methods`) draw through: images, conditions
(class labels or prompt embeddings), noise, sigmas and augmentations of one slot, plus the run's
autocast. It only draws: the networks run in the methods.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..io.data import ImageDataset
from ..nets.build import autocast
from ..nets.sampler import sample_karras_grid_sigma
from .augment import AugmentPipe


def make_generators(seed: int, rank: int, device: torch.device, rounds: int = 1) -> dict[str, torch.Generator]:
    """The generators of one process: every random draw of a loop comes from one of them, so
    their state can be checkpointed.

    There is one pair per *micro-batch slot*: accumulation round r of rank k is global slot
    k * rounds + r, and its generators are seeded by that slot. One process running two
    accumulation rounds therefore draws exactly what two processes running one round each
    draw, and a run's result does not depend on how its global batch is split.
    `noise` (round r: `noise/r`) lives on the compute device (latents, sigmas, noise); `data`
    (`data/r`) on the CPU (dataset indices and labels, which index host-side datasets).
    """
    gens = {}
    for r in range(rounds):
        base = seed * 1_000_003 + (rank * rounds + r) * 7919
        noise = torch.Generator(device=device)
        noise.manual_seed(base)
        data = torch.Generator()
        data.manual_seed(base + 1)
        suffix = "" if r == 0 else f"/{r}"
        gens["noise" + suffix], gens["data" + suffix] = noise, data
    return gens


def slot_generator(gens: dict[str, torch.Generator], kind: str, r: int) -> torch.Generator:
    """The `kind` ('noise' or 'data') generator of accumulation round `r`."""
    return gens[kind if r == 0 else f"{kind}/{r}"]


def capture_rng(gens: dict[str, torch.Generator]) -> dict:
    """This process's RNG states: the loop's named generators, torch's global one (dropout), CUDA's."""
    out = {"gens": {k: g.get_state() for k, g in gens.items()}, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(gens: dict[str, torch.Generator], states: dict) -> None:
    """Inverse of `capture_rng`."""
    for k, g in gens.items():
        g.set_state(states["gens"][k])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class Draws:
    """The random draws of one distillation run, per micro-batch slot `r` (0..rounds-1).

    Data draws (dataset indices, labels) come from slot r's `data` stream, everything else
    (latents, sigmas, noise, augmentations) from its `noise` stream; a method's fixed order of
    calls per slot is what makes its iteration replayable. `micro` is the slot's batch size,
    `total` the process's batch (micro x rounds) that per-sample sums are divided by.
    """

    def __init__(self, gens: dict[str, torch.Generator], rounds: int, micro: int, device: torch.device,
                 dataset: ImageDataset | None, img_shape: tuple[int, int, int], label_dim: int, text: bool,
                 precision: str, augment: AugmentPipe | None) -> None:
        self.gens, self.rounds, self.micro, self.device = gens, rounds, micro, device
        self.total = micro * rounds
        self.dataset = dataset
        self.img_shape, self.label_dim = img_shape, label_dim
        self.precision = precision
        self.augment_pipe = augment
        # A text teacher's conditions are prompt embeddings from the dataset (a prompt set).
        self.text = text
        if text and dataset is None:
            raise ConfigError("a text teacher's run draws its prompts from `data`: set data.kind to prompts (SiD) or "
                              "captioned_images (SiDA, SiD2A)")

    def data_gen(self, r: int) -> torch.Generator:
        return slot_generator(self.gens, "data", r)

    def noise_gen(self, r: int) -> torch.Generator:
        return slot_generator(self.gens, "noise", r)

    def indices(self, n: int, r: int) -> torch.Tensor:
        """`n` dataset indices drawn with replacement from this slot's data stream."""
        return torch.randint(len(self.dataset), (n,), generator=self.data_gen(r))

    def labels(self, n: int, r: int) -> torch.Tensor:
        """The conditions of `n` dataset samples: class labels, as the official loops take them
        from data batches (so unequal class sizes, e.g. ImageNet's, are respected), or, for a
        text teacher, the encoded prompts of a prompt set (`text`). Without a dataset (analytic
        tests, benchmarks) labels are uniform over the classes."""
        if self.text:
            return self.dataset.labels(self.indices(n, r)).to(self.device, non_blocking=True)
        if self.label_dim == 0:
            return torch.zeros([n, 0], device=self.device)
        if self.dataset is not None:
            return self.dataset.labels(self.indices(n, r)).to(self.device, non_blocking=True)
        idx = torch.randint(self.label_dim, (n,), generator=self.data_gen(r))
        return F.one_hot(idx, self.label_dim).float().to(self.device)

    def real(self, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Real images with their labels; the generator is then conditioned on the same labels."""
        # Latent datasets draw each latent as mean + N(0,1) std: from the same slot stream.
        x, labels = self.dataset.get_batch(self.indices(n, r), generator=self.data_gen(r))
        return x.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def randn(self, shape: Sequence[int], r: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.noise_gen(r), device=self.device)

    def rand(self, shape: Sequence[int], r: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.noise_gen(r), device=self.device)

    def randint(self, high: int, shape: Sequence[int], r: int) -> torch.Tensor:
        return torch.randint(high, tuple(shape), generator=self.noise_gen(r), device=self.device)

    def grid_sigma(self, lo: int, hi: int, r: int) -> torch.Tensor:
        """`micro` sigmas drawn on the teacher's Karras grid indices lo..hi, [micro,1,1,1]."""
        return sample_karras_grid_sigma(self.micro, lo, hi, generator=self.noise_gen(r), device=self.device)

    def timestep_sigma(self, log_sigmas: torch.Tensor, lo: int, hi: int, r: int) -> torch.Tensor:
        """`micro` noise levels sigma_k of integer timesteps k ~ U[lo, hi) of a diffusers
        teacher's table (its `log_sigmas`), [micro,1,1,1] (SiD-LSG's torch.randint(tmin, tmax))."""
        k = self.randint(hi - lo, [self.micro], r) + lo
        return log_sigmas.to(self.device)[k].exp().reshape(-1, 1, 1, 1)

    def drop_prompts(self, cond: torch.Tensor, uncond: torch.Tensor, ratio: float, r: int) -> torch.Tensor:
        """`cond` with each row replaced by the empty prompt's embedding `uncond` [1, L, D] with
        probability `ratio` (SiD-LSG's context dropout), drawn from the slot's data stream."""
        drop = torch.rand([cond.shape[0]], generator=self.data_gen(r)) < ratio
        drop = drop.to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
        return torch.where(drop, uncond.to(cond.dtype), cond)

    def autocast(self) -> AbstractContextManager:
        """torch.autocast for `precision: bf16`; fp16 needs none (the networks run EDM's fp16 path
        themselves, see `sida.train.nets.apply_precision`) and fp32 none either."""
        return autocast(self.device, "bf16" if self.precision == "bf16" else "fp32")

    def augment(self, images: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fake score's input augmentation (none when the run has `augment: 0`): (images,
        their augmentation labels or None)."""
        if self.augment_pipe is None:
            return images, None
        return self.augment_pipe(images, self.noise_gen(r))
