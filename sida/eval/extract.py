"""Features of generated and real images, sharded over ranks: rank r takes every world_size-th
item, and the features are gathered back in seed (or index) order on every rank, so the result
does not depend on the process count.

- `extract_generated_multi` / `extract_generated`: features (and class probabilities) of the
  samples of a seed range, generated once for every extractor.
- `dataset_features`: features of real images (for reference statistics).
- `Progress`: the progress lines these print on stderr.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import numpy as np
import torch

from ..io.images import quantize
from ..run import dist
from .features import Extractor
from .noise import latents_for_seeds
from .sampling import GenerateFn

__all__ = ["Progress", "gather_in_order", "extract_generated_multi", "extract_generated", "dataset_features"]


class Progress:
    """Lines on stderr (main process only): items done, rate; at most one every `every_s` seconds."""

    def __init__(self, desc: str, total: int, enabled: bool = True, every_s: float = 10.0) -> None:
        self.desc, self.total, self.enabled, self.every_s = desc, total, enabled, every_s
        self.t0 = self.last = time.time()

    def update(self, done: int, force: bool = False) -> None:
        now = time.time()
        if self.enabled and (force or now - self.last >= self.every_s):
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            print(f"[evaluate] {self.desc}: {done}/{self.total} ({rate:.1f}/s)", file=sys.stderr, flush=True)


def gather_in_order(positions: list[int], feats: np.ndarray, probs: np.ndarray | None,
                     total: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Every rank's (positions, features, probs) reassembled in position order (on every rank)."""
    parts = dist.gather_objects((positions, feats, probs))
    # Widths from a rank that had items: a rank without seeds sends placeholders.
    full = [pt for pt in parts if len(pt[0])] or parts
    f_out = np.zeros([total, full[0][1].shape[1]], dtype=np.float32)
    p_out = None if full[0][2] is None else np.zeros([total, full[0][2].shape[1]], dtype=np.float32)
    for pos, f, p in parts:
        if len(pos):
            f_out[pos] = f
            if p_out is not None:
                p_out[pos] = p
    return f_out, p_out


def _run_extractor(extractor: Extractor, images_u8: torch.Tensor, want_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
    f, p = extractor(images_u8)
    return f.float().cpu().numpy(), (p.float().cpu().numpy() if (want_probs and p is not None) else None)


@torch.no_grad()
def extract_generated_multi(extractors: Sequence[Extractor], generate: GenerateFn, seeds: Sequence[int],
                            shape: Sequence[int], label_dim: int, batch: int, info: dist.DistInfo,
                            desc: str = "samples", want_probs: bool = True, labels: str = "random",
                            latents: str = "iid") -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Features (and class probabilities) of `generate(z, labels)` for every seed, in seed order,
    from each extractor: the images are generated once and go through every extractor (FID and
    FD-DINOv2 of the same samples, as EDM2 reports them, for the price of one sampling pass).

    Images are quantised to uint8 exactly as saved PNGs would be, then go through the extractors
    in batches on the device (no per-image numpy round trip). `seeds` are one run's, consecutive
    (the run of `sobol` latents starts at the first). Returns one (features [N, D], probs [N, K]
    or None) per extractor.
    """
    seeds = list(seeds)
    run_start = seeds[0] if seeds else 0
    if latents == "sobol" and seeds != list(range(run_start, run_start + len(seeds))):
        raise ValueError("sobol latents need one run's consecutive seeds")
    mine = list(range(info.rank, len(seeds), info.world_size))
    feats: list[list[np.ndarray]] = [[] for _ in extractors]
    probs: list[list[np.ndarray]] = [[] for _ in extractors]
    prog = Progress(desc, len(seeds), info.is_main)
    for i in range(0, len(mine), batch):
        pos = mine[i:i + batch]
        z, c = latents_for_seeds([seeds[j] for j in pos], shape, label_dim, info.device, labels, latents, run_start)
        images = quantize(generate(z, c))
        for k, extractor in enumerate(extractors):
            f, p = _run_extractor(extractor, images, want_probs)
            feats[k].append(f)
            if p is not None:
                probs[k].append(p)
        prog.update(min(len(seeds), (i + len(pos)) * info.world_size))
    out = []
    for extractor, fk, pk in zip(extractors, feats, probs):
        f_all = np.concatenate(fk) if fk else np.zeros([0, extractor.feature_dim], np.float32)
        p_all = np.concatenate(pk) if pk else None
        if p_all is None and want_probs and extractor.has_probs and not fk:
            p_all = np.zeros([0, 1], np.float32)  # a rank with no seeds still answers the gather
        out.append(gather_in_order(mine, f_all, p_all, len(seeds)))
    prog.update(len(seeds), force=True)
    return out


def extract_generated(extractor: Extractor, generate: GenerateFn, seeds: Sequence[int], shape: Sequence[int],
                      label_dim: int, batch: int, info: dist.DistInfo, desc: str = "samples",
                      want_probs: bool = True, labels: str = "random", latents: str = "iid"
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """`extract_generated_multi` with one extractor: (features [N, D], probs [N, K] or None)."""
    return extract_generated_multi([extractor], generate, seeds, shape, label_dim, batch, info, desc,
                                   want_probs, labels, latents)[0]


@torch.no_grad()
def dataset_features(extractor: Extractor, ds, indices: Sequence[int], batch: int, info: dist.DistInfo,
                     desc: str = "reference images") -> np.ndarray:
    """Features of the dataset images `indices` (uint8, as stored), sharded over ranks, in order."""
    indices = list(indices)
    mine = list(range(info.rank, len(indices), info.world_size))
    feats = []
    prog = Progress(desc, len(indices), info.is_main)
    for i in range(0, len(mine), batch):
        pos = mine[i:i + batch]
        arr = ds.uint8_images([indices[j] for j in pos])  # NHWC
        u8 = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(info.device)
        feats.append(_run_extractor(extractor, u8, False)[0])
        prog.update(min(len(indices), (i + len(pos)) * info.world_size))
    f_all = np.concatenate(feats) if feats else np.zeros([0, extractor.feature_dim], np.float32)
    f_all, _ = gather_in_order(mine, f_all, None, len(indices))
    prog.update(len(indices), force=True)
    return f_all

