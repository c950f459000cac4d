"""The noise and class labels of evaluation samples: every sample from its own seed (EDM-style),
so a sample does not depend on the batch size, the process count or which rank drew it.

- `seed_ranges`: the disjoint seed ranges of N runs of M samples (recorded in metrics.json).
- `latents_for_seeds`: z and the class label of every seed. Labels are `random` (drawn from the
  seed: EDM's and the papers' protocol) or `balanced` (seed mod label_dim: exactly equal class
  counts per run, which removes the large run-to-run spread that random class proportions cause
  in a classifier's features). The noise is `iid` (N(0, I) from each seed) or `sobol`
  (randomized quasi-Monte Carlo: `sobol_latents`).
- `class_counts`: the class counts of a seed range (recorded per run); `balanced_indices`: a
  class-balanced subset of real images, to compare with balanced labels.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError

__all__ = ["seed_ranges", "LABEL_MODES", "LATENT_MODES", "seed_label", "sobol_latents", "latents_for_seeds",
           "class_counts", "balanced_indices", "seed_note"]


def seed_ranges(seed: int, num_runs: int, num_samples: int) -> list[range]:
    """Run r uses seeds [seed + r*M, seed + (r+1)*M): disjoint, reproducible, recorded."""
    return [range(seed + r * num_samples, seed + (r + 1) * num_samples) for r in range(num_runs)]


LABEL_MODES = ("random", "balanced")


def seed_label(seed: int, label_dim: int) -> int:
    """The class of `seed` under balanced labels: seed mod label_dim.

    Any label_dim consecutive seeds hold every class once, so a seed range whose length is a
    multiple of label_dim has exactly equal counts, wherever it starts, however it is batched.
    """
    return int(seed) % label_dim


LATENT_MODES = ("iid", "sobol")


def _sobol_stream_seed(run_start: int, stream: int) -> int:
    """The scrambling seed of one Sobol stream: a hash of (run, stream), so runs and classes get
    independent randomizations (63 bits: what torch.Generator takes)."""
    digest = hashlib.sha256(f"sida-sobol:{int(run_start)}:{int(stream)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sobol_latents(seeds: Sequence[int], run_start: int, shape: Sequence[int], label_dim: int,
                  labels: str) -> torch.Tensor:
    """z of `seeds` (seeds of the run whose first seed is `run_start`) by randomized quasi-Monte
    Carlo: a scrambled Sobol sequence (torch.quasirandom: linear matrix scrambling and a random
    digital shift) mapped through the normal quantile, so every z is still exactly N(0, I) but
    the points of one run cover the noise space evenly instead of clumping as independent draws do.

    Why: the FD of n samples moves with the luck of the draw; the same network evaluated on
    different seed ranges spreads by several times the differences between models. On the
    embedded digits default a SiD student's FD over scrambled Sobol runs of 4,000 samples has a
    quarter of the spread it has over 4,000 independent draws (`python -m bench.eval_spread`; the
    figures are in docs/evaluation.md). Each run is one independent scrambling, so the runs are
    independent replicates and their standard error still means what it says.

    Streams: with balanced labels one stream per class (class = seed mod label_dim; the k-th
    sample of a class in the run is the stream's point k), else one per run (point = seed -
    run_start). A point depends only on (run_start, stream, index): not on batching, process count
    or rank.
    """
    shape, dim = list(shape), math.prod(shape)
    if dim > torch.quasirandom.SobolEngine.MAXDIM:
        raise ConfigError(f"evaluate.latents: sobol supports at most {torch.quasirandom.SobolEngine.MAXDIM} noise "
                          f"dimensions, these samples have {dim} ({'x'.join(map(str, shape))}): use latents: iid")
    seeds = [int(s) for s in seeds]
    per_class = labels == "balanced" and label_dim > 0
    streams: dict[int, list[tuple[int, int]]] = {}
    for pos, s in enumerate(seeds):
        if s < run_start:
            raise ValueError(f"seed {s} precedes its run's first seed {run_start}")
        key, index = ((seed_label(s, label_dim), (s - run_start) // label_dim) if per_class else (0, s - run_start))
        streams.setdefault(key, []).append((pos, index))
    z = torch.empty([len(seeds), dim], dtype=torch.float64)
    for key, items in streams.items():
        engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=_sobol_stream_seed(run_start, key))
        lo = min(i for _, i in items)
        engine.fast_forward(lo)
        points = engine.draw(max(i for _, i in items) - lo + 1, dtype=torch.float64)
        pos, index = torch.tensor(items).T
        z[pos] = points[index - lo]
    # scrambled points are never exactly 0 or 1 in exact arithmetic; the clamp keeps ndtri finite
    eps = torch.finfo(torch.float64).eps
    return torch.special.ndtri(z.clamp(eps, 1 - eps)).to(torch.float32).reshape([len(seeds)] + shape)


def latents_for_seeds(seeds: Sequence[int], shape: Sequence[int], label_dim: int,
                      device: torch.device | str = "cpu", labels: str = "random", latents: str = "iid",
                      run_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z ~ N(0, I) of `shape` and a one-hot class label per sample, each from its own seed.

    `labels`: 'random' draws the class from the seed's generator after z (EDM's protocol, the
    papers' numbers); 'balanced' takes `seed_label` (equal class counts). `latents`: 'iid' draws
    z from the seed's generator; 'sobol' takes it from `sobol_latents` of the run starting at
    `run_start` (labels as with iid).
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    if latents not in LATENT_MODES:
        raise ValueError(f"latents must be one of {LATENT_MODES}, not {latents!r}")
    zs, classes = [], []
    # a random label is drawn after z from the seed's generator, so z is drawn even when sobol replaces it
    draw_z = latents == "iid" or (label_dim > 0 and labels == "random")
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        if draw_z:
            zs.append(torch.randn(list(shape), generator=g))
        if label_dim > 0:
            classes.append(seed_label(s, label_dim) if labels == "balanced"
                           else int(torch.randint(label_dim, (1,), generator=g)))
    if latents == "sobol":
        if run_start is None:
            raise ValueError("sobol latents need the run's first seed (run_start)")
        z = sobol_latents(seeds, run_start, shape, label_dim, labels).to(device)
    else:
        z = torch.stack(zs).to(device)
    if label_dim == 0:
        return z, None
    onehot = torch.nn.functional.one_hot(torch.tensor(classes), label_dim).to(torch.float32).to(device)
    return z, onehot


def class_counts(seeds: Sequence[int], shape: Sequence[int], label_dim: int, labels: str) -> list[int] | None:
    """How many of `seeds` get each class (None when unconditional). Random labels are drawn
    after z of `shape` from the seed's generator, so they are replayed with the same shape."""
    if label_dim == 0:
        return None
    if labels == "balanced":
        counts = np.bincount([seed_label(s, label_dim) for s in seeds], minlength=label_dim)
    else:
        c = latents_for_seeds(seeds, shape, label_dim, labels=labels)[1]
        counts = c.sum(0).round().to(torch.int64).numpy()
    return [int(x) for x in counts]


def balanced_indices(classes: np.ndarray, label_dim: int, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted dataset indices with the same number of images of every class.

    `per_class` defaults to the rarest class's count; the images kept of each class are a fixed
    random choice (`seed`), since datasets are often sorted within a class.
    """
    classes = np.asarray(classes)
    counts = np.bincount(classes, minlength=label_dim)
    k = int(counts.min()) if per_class is None else min(int(per_class), int(counts.min()))
    if k < 1:
        raise DataError(f"the dataset has no images of class {int(counts.argmin())}: balanced evaluation "
                        f"labels need every class (set evaluate.labels: random)")
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(classes == c))[:k] for c in range(label_dim)]
    return np.sort(np.concatenate(keep))


def seed_note(labels: str, latents: str) -> str:
    """How the seeds of metrics.json map to samples, in words (recorded beside them)."""
    z = ("z from a scrambled Sobol stream per run" + (" and class" if labels == "balanced" else "")
         if latents == "sobol" else "z from each seed")
    label = "class = seed mod label_dim" if labels == "balanced" else "class label from each seed"
    return f"inclusive ranges; {z}, {label}"
