"""Evaluation: sample with per-seed noise, extract features in batches on the device, score.

- `seed_ranges`: the disjoint seed ranges of N runs of M samples (recorded in metrics.json).
- `latents_for_seeds`: noise and class label of every sample from its own seed (EDM-style), so a
  sample does not depend on the batch size, the process count or which rank drew it. Labels are
  `random` (drawn from the seed: EDM's and the papers' protocol) or `balanced` (seed mod
  label_dim: exactly equal class counts per run, which removes the large run-to-run spread that
  random class proportions cause in a classifier's features). The noise is `iid` (N(0, I) from
  each seed) or `sobol` (randomized quasi-Monte Carlo: `sobol_latents`).
- `reference_indices`: the real images behind computed statistics; class-balanced with balanced
  labels, so real and generated sets have the same class proportions.
- `extract_generated` / `dataset_features`: features of generated / real images, sharded over
  ranks (rank r takes every world_size-th item) and gathered back in seed order.
- `get_reference`: reference statistics from an EDM fid-refs file or computed from the dataset
  once and cached (keyed by the dataset config and the extractor's hash).
- `evaluate_network`: the whole evaluation behind `stages.evaluate`.
- `TrainingMonitor`: a quick FD/FID during distillation, for keeping the best checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..run import dist
from ..io.atomic import atomic_write
from ..io.npz import load_npz
from ..errors import AssetError, ConfigError, DataError
from .features import Extractor, build_extractor, cache_dir, file_sha256, quantize
from .metrics import feature_stats, frechet_distance, inception_score, precision_recall
from .stats import summarize

__all__ = ["seed_ranges", "LABEL_MODES", "LATENT_MODES", "seed_label", "sobol_latents", "latents_for_seeds", "class_counts", "balanced_indices",
           "extract_generated", "extract_generated_multi", "dataset_features", "Reference", "reference_indices", "get_reference", "score_run",
           "make_generate", "sample_grid", "extractor_config", "Evaluand", "prepare_evaluand", "evaluate_network", "TrainingMonitor", "Progress"]

GenerateFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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


def _gather_in_order(positions: list[int], feats: np.ndarray, probs: np.ndarray | None,
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
        out.append(_gather_in_order(mine, f_all, p_all, len(seeds)))
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
    f_all, _ = _gather_in_order(mine, f_all, None, len(indices))
    prog.update(len(indices), force=True)
    return f_all


@dataclass
class Reference:
    """Reference statistics (and, for precision/recall, a subset of real features)."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str                      # "file" | "dataset"
    path: str
    sha256: str
    num_images: int | None
    resolution: int | None
    features: np.ndarray | None = None
    class_counts: list[int] | None = None   # images per class behind the statistics (None: unknown)
    notes: list[str] = field(default_factory=list)

    @property
    def info(self) -> dict:
        """JSON-able description for metrics.json."""
        return {"source": self.source, "path": self.path, "sha256": self.sha256, "num_images": self.num_images,
                "resolution": self.resolution, "feature_dim": int(self.mu.shape[0]),
                "pr_real_features": None if self.features is None else int(self.features.shape[0]),
                "class_counts": self.class_counts or None}


def _ref_cache_key(cfg: dict, extractor: Extractor) -> str:
    ev = cfg["evaluate"]
    key = {"data": {k: cfg["data"].get(k) for k in ("kind", "path", "resolution", "channels", "xflip")},
           "extractor": extractor.sha256, "mode": extractor.mode, "max_images": ev["reference_max_images"],
           "pr_max": ev["pr_max_samples"]}
    if _balanced_reference(cfg):
        key["labels"] = "balanced"  # (absent for random labels: earlier caches stay valid)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _balanced_reference(cfg: dict) -> bool:
    """Balanced generated labels are compared with a class-balanced subset of the real images."""
    return cfg["evaluate"]["labels"] == "balanced" and cfg["data"]["label_dim"] > 0


def reference_indices(cfg: dict, ds) -> np.ndarray:
    """The dataset images behind computed reference statistics, sorted.

    With `evaluate.labels: balanced` (and a labelled dataset) an equal number of every class, so
    that real and generated sets have the same class proportions; otherwise every image. Capped
    at `evaluate.reference_max_images` by a fixed random choice (the first n could be sorted by class).
    """
    cap = cfg["evaluate"]["reference_max_images"]
    if _balanced_reference(cfg):
        label_dim = cfg["data"]["label_dim"]
        onehot = ds.labels(np.arange(len(ds))).numpy()
        if not np.array_equal(onehot.sum(1), np.ones(len(ds))) or not np.isin(onehot, (0, 1)).all():
            raise DataError(f"dataset {cfg['data']['kind']} has non-class (soft) labels: balanced evaluation labels "
                            f"need one class per image (set evaluate.labels: random)")
        return balanced_indices(onehot.argmax(1), label_dim, None if cap is None else cap // label_dim)
    n = len(ds) if cap is None else min(len(ds), cap)
    return np.arange(len(ds)) if n == len(ds) else np.sort(np.random.default_rng(0).permutation(len(ds))[:n])


def _dataset_reference(cfg: dict, extractor: Extractor, info: dist.DistInfo) -> Reference:
    """Statistics of the dataset under `extractor`, computed once and cached atomically."""
    from ..io.data import open_dataset

    ev = cfg["evaluate"]
    path = cache_dir(cfg) / f"refstats-{extractor.name}-{_ref_cache_key(cfg, extractor)}.npz"
    if not path.is_file():
        ds = open_dataset(cfg["data"])
        extractor.check_images(ds.resolution, ds.channels, f"dataset {cfg['data']['kind']}")
        idx = reference_indices(cfg, ds)
        feats = dataset_features(extractor, ds, idx.tolist(), ev["batch"], info)
        mu, sigma = feature_stats(feats)
        keep = np.random.default_rng(1).permutation(len(feats))[:ev["pr_max_samples"]]
        counts = ds.labels(idx).sum(0).round().numpy().astype(np.int64) if ds.label_dim else np.zeros(0, np.int64)
        if info.is_main:
            with atomic_write(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, mu=mu, sigma=sigma, features=feats[np.sort(keep)], num_images=len(idx),
                         resolution=ds.resolution, channels=ds.channels, extractor_sha256=extractor.sha256,
                         class_counts=counts)
        dist.barrier()
    z = load_npz(path, "reference cache", "delete it and rerun (it is recomputed)")
    try:
        ref = Reference(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), "dataset", str(path), "",
                        int(z["num_images"]), int(z["resolution"]), z["features"].astype(np.float32),
                        class_counts=[int(c) for c in z["class_counts"]] if "class_counts" in z else None)
    except KeyError as exc:
        raise DataError(f"reference cache {path} lacks {exc}: delete it and rerun (it is recomputed)") from None
    ref.sha256 = file_sha256(path)
    return ref


def resolve_reference(cfg: dict) -> str:
    """'dataset' or the path of a statistics file, from `evaluate.reference` ('auto' looks at fetch)."""
    ref = cfg["evaluate"]["reference"]
    if ref != "auto":
        return ref
    assets = (cfg.get("fetch") or {}).get("assets") or []
    if any(isinstance(a, dict) and a.get("kind") == "refstats" for a in assets):
        from .features import resolve_extractor_name

        # A multi-metric statistics file (EDM2's img512.pkl) is split by the fetch stage into
        # refstats.npz (FID) and refstats-<extractor>.npz (e.g. refstats-dinov2.npz).
        name = "refstats-dinov2.npz" if resolve_extractor_name(cfg) == "dinov2" else "refstats.npz"
        return str(Path(cfg["results_dir"]) / cfg["experiment"] / "fetch" / name)
    return "dataset"


def get_reference(cfg: dict, extractor: Extractor, info: dist.DistInfo, resolution: int,
                  need_features: bool = False) -> Reference:
    """The reference statistics the config names, checked against the extractor and resolution.

    A file (EDM fid-refs `.npz` with `mu`, `sigma`; optional `resolution`) or the dataset. With
    `need_features` (precision/recall) real features come from the dataset cache; when the dataset
    cannot be opened, PR is skipped with a note instead of failing the whole evaluation.
    """
    which = resolve_reference(cfg)
    if which == "dataset":
        ref = _dataset_reference(cfg, extractor, info)
    else:
        from .refstats import load_ref_stats

        mu, sigma = load_ref_stats(which)
        z = load_npz(which, "reference statistics", "download them again (run the fetch stage) or fix the path")
        res = int(z["resolution"]) if "resolution" in z else None
        ref = Reference(mu, sigma, "file", str(which), file_sha256(which), None, res)
    if ref.mu.shape[0] != extractor.feature_dim:
        raise DataError(f"reference statistics {ref.path} hold {ref.mu.shape[0]}-dimensional features but the "
                        f"{extractor.name} extractor gives {extractor.feature_dim}: use statistics made with the "
                        f"same extractor (evaluate.reference / evaluate.extractor)")
    if ref.resolution is not None and ref.resolution != resolution:
        raise DataError(f"reference statistics {ref.path} were computed at resolution {ref.resolution} but the "
                        f"images evaluated are {resolution}x{resolution}: use the reference of this dataset")
    if need_features and ref.features is None:
        try:
            ref.features = _dataset_reference(cfg, extractor, info).features
        except (DataError, AssetError) as exc:
            ref.notes.append(f"precision/recall skipped: {exc}")
    return ref


def score_run(ref: Reference, feats: np.ndarray, probs: np.ndarray | None, cfg: dict, key: str,
              device: torch.device | str = "cpu") -> dict:
    """FD/FID against the reference, IS (when probs), precision/recall (when real features)."""
    ev = cfg["evaluate"]
    mu, sigma = feature_stats(feats)
    out = {key: frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ev["inception_score"] and probs is not None:
        out["is"], out["is_std"] = inception_score(probs, ev["is_splits"])
    if ev["precision_recall"] and ref.features is not None:
        n = ev["pr_max_samples"]
        out["precision"], out["recall"] = precision_recall(ref.features[:n], feats[:n], ev["pr_k"], device=device)
    return out


def make_generate(net: torch.nn.Module, kind: str, cfg: dict, decode: Callable | None = None,
                  steps: int = 1) -> tuple[GenerateFn, int]:
    """(generate(z, labels) -> images in [-1, 1], NFE) for a distilled generator in `steps` steps
    at the generation sigmas its network file records (SiD family 2.5, DMD2 80, ADD its student
    levels), or the Heun teacher. `decode` (latent-space configs: `LatentDecoder.unit`) turns the
    network's latents into images."""
    from ..nets.sampler import heun_sampler
    from .sampling import generator_fn

    if kind == "generator":
        fn, nfe = generator_fn(net, steps, float(cfg["distill"]["sigma_init"])), steps
    elif kind == "teacher":
        steps = int(cfg["evaluate"]["teacher_steps"])
        fn, nfe = (lambda z, c: heun_sampler(net, z, c, num_steps=steps)), 2 * steps - 1
    else:
        raise ValueError(f"unknown kind {kind!r} (generator or teacher)")
    return (fn if decode is None else (lambda z, c: decode(fn(z, c)))), nfe


def _decode_fn(cfg: dict, device: torch.device | str) -> Callable | None:
    """The VAE decoding of latent-space configs (None in pixel space)."""
    from ..io.latents import decoder_from_config

    decoder = decoder_from_config(cfg, device)
    return None if decoder is None else decoder.unit


def _check_network(net: torch.nn.Module, cfg: dict, path: str) -> tuple[int, int, int]:
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
                sigmas: Sequence[float] | None = None) -> torch.Tensor:
    """The evaluation's sample grid in [-1, 1]: `grid_size` columns, one row per class (class-
    conditional) or grid_size rows; the same latents for every model of the experiment.
    `decode` as in `make_generate` (latent-space networks); `sigmas`: a generator's generation
    sigmas as evaluated (default: one step at distill.sigma_init)."""
    from .sampling import grid_samples

    ev = cfg["evaluate"]
    steps = ev["teacher_steps"] if kind == "teacher" else 1
    return grid_samples(net, ev["grid_size"], ev["seed"], steps=steps, sigma_init=cfg["distill"]["sigma_init"],
                        decode=decode, sigmas=sigmas if kind == "generator" else None)


def _monitor_protocol(cfg: dict, feats: np.ndarray, ref: Reference, key: str, first_seed: int) -> dict | None:
    """FD/FID of the first `during_training.num_samples` evaluation samples: the training
    monitor's sample count and labels (so its bias), from the evaluation's own seeds, so it costs
    no extra sampling (35-NFE teachers are what evaluation time is spent on). None when the
    monitor is off or the evaluation has fewer samples."""
    s = cfg["evaluate"]["during_training"]
    n = int(s["num_samples"])
    if float(s["every_kimg"]) <= 0 or len(feats) < n:
        return None
    return {key: frechet_distance(*feature_stats(feats[:n]), ref.mu, ref.sigma), "num_samples": n,
            "seeds": [first_seed, first_seed + n - 1]}


def extractor_config(cfg: dict, name: str) -> dict:
    """`cfg` with `evaluate.extractor` set to `name` (what an extra feature network's reference
    statistics and weights are resolved with)."""
    return {**cfg, "evaluate": {**cfg["evaluate"], "extractor": name}}


def _extra_metrics(cfg: dict, info: dist.DistInfo, res: int, ch: int, what: str) -> list[tuple[Extractor, Reference]]:
    """(extractor, reference) of every `evaluate.extra_extractors` entry, checked like the main one."""
    out = []
    for name in cfg["evaluate"].get("extra_extractors") or []:
        xcfg = extractor_config(cfg, name)
        x = build_extractor(xcfg, info.device)
        x.check_images(res, ch, f"network {what}")
        out.append((x, get_reference(xcfg, x, info, res)))
    return out


def _seed_note(labels: str, latents: str) -> str:
    z = ("z from a scrambled Sobol stream per run" + (" and class" if labels == "balanced" else "")
         if latents == "sobol" else "z from each seed")
    label = "class = seed mod label_dim" if labels == "balanced" else "class label from each seed"
    return f"inclusive ranges; {z}, {label}"


@dataclass
class Evaluand:
    """A network ready to be scored: `generate(z, labels)` (decoded to images for latent
    networks), its NFE, the noise shape (C, H, W) and label_dim, the extractor and its reference."""

    net: torch.nn.Module
    generate: GenerateFn
    nfe: int
    shape: tuple[int, int, int]
    label_dim: int
    extractor: Extractor
    ref: Reference
    decode: Callable | None


def prepare_evaluand(cfg: dict, network: str | Path, kind: str, info: dist.DistInfo, steps: int = 1,
                     need_features: bool = False) -> Evaluand:
    """Load `network` (checked against the config's data), the config's extractor (checked against
    the images) and reference statistics, and the sampler of `kind` ('generator' in `steps`
    steps, or the Heun 'teacher'): what `evaluate_network` and `bench.eval_spread` score with."""
    from ..io.checkpoints import load_network

    net = load_network(network, info.device)
    res, ch, label_dim = _check_network(net, cfg, str(network))
    extractor = build_extractor(cfg, info.device)
    extractor.check_images(res, ch, f"network {network}")
    ref = get_reference(cfg, extractor, info, res, need_features=need_features)
    decode = _decode_fn(cfg, info.device)
    generate, nfe = make_generate(net, kind, cfg, decode, steps)
    return Evaluand(net, generate, nfe, (ch, res, res), label_dim, extractor, ref, decode)


def evaluate_network(cfg: dict, network: str | Path, kind: str, name: str, info: dist.DistInfo,
                     steps: int = 1, label: str | None = None, train_seed: int | None = None,
                     keep: tuple[Path, str] | None = None) -> tuple[dict, torch.Tensor | None]:
    """Evaluate a network file over `num_runs` runs of `num_samples` samples.

    Returns (metrics dict for metrics.json, the sample grid in [-1, 1] on the main process, else
    None). All ranks take part; the metrics are complete on every rank. Every metric's summary
    carries its standard error over runs; `monitor` is the network's FD/FID at the training
    monitor's sample count, for plotting next to the training curves (see `_monitor_protocol`).
    `keep` (work dir, name): each finished run is kept there and taken on a rerun (`RunStore`).
    """
    from ..nets.sampler import sampling_sigmas
    from ..run.config import config_hash
    from .runstore import RunStore
    from .sampling import generator_sigmas

    t0 = time.time()
    ev = cfg["evaluate"]
    e = prepare_evaluand(cfg, network, kind, info, steps, need_features=ev["precision_recall"])
    net, extractor, ref, decode, generate, nfe, label_dim = (e.net, e.extractor, e.ref, e.decode, e.generate, e.nfe,
                                                             e.label_dim)
    ch, res, _ = e.shape
    extras = _extra_metrics(cfg, info, res, ch, str(network))
    notes = ref.notes + [n for _, xref in extras for n in xref.notes]
    for note in notes:
        if info.is_main:
            print(f"[evaluate] {note}", file=sys.stderr, flush=True)
    # the noise levels a generator is sampled at (its network file's, see make_generate)
    sigmas = sampling_sigmas(generator_sigmas(net, cfg["distill"]["sigma_init"]), steps) if kind == "generator" else None
    key = extractor.metric_key
    ranges = seed_ranges(ev["seed"], ev["num_runs"], ev["num_samples"])
    store = None if keep is None else RunStore(*keep, key={
        "cfg": config_hash(cfg), "network": file_sha256(network), "kind": kind, "steps": steps,
        "world_size": info.world_size}, info=info)
    runs, head = [], []
    for r, seeds in enumerate(ranges):
        kept = store.load(r) if store is not None else None
        if kept is None:
            (feats, probs), *extra_feats = extract_generated_multi(
                [extractor] + [x for x, _ in extras], generate, seeds, (ch, res, res), label_dim, ev["batch"], info,
                desc=f"{name} run {r + 1}/{len(ranges)}", want_probs=ev["inception_score"], labels=ev["labels"],
                latents=ev["latents"])
            run_head = feats[:max(0, ev["during_training"]["num_samples"] - sum(len(h) for h in head))]
            scores = score_run(ref, feats, probs, cfg, key, info.device) if info.is_main else {}
            if info.is_main:  # the extra feature networks' Fréchet distances of the same samples
                for (x, xref), (xf, _) in zip(extras, extra_feats):
                    scores[x.metric_key] = frechet_distance(*feature_stats(xf), xref.mu, xref.sigma)
            scores = dist.broadcast_object(scores)
            if store is not None:
                store.save(r, scores, run_head)
        else:
            scores, run_head = kept
        head.append(run_head)
        runs.append({"run": r, "seeds": [seeds.start, seeds.stop - 1], **scores,
                     "class_counts": class_counts(seeds, (ch, res, res), label_dim, ev["labels"])})
        if info.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            how = f" (kept from {store.path(r)})" if kept is not None else ""
            print(f"[evaluate] {name} run {r + 1}/{len(ranges)}: {shown}{how}", file=sys.stderr, flush=True)
    summary = {k: summarize([run[k] for run in runs]) for k in runs[0] if k not in ("run", "seeds", "class_counts")}
    monitor = _monitor_protocol(cfg, np.concatenate(head), ref, key, ranges[0].start) if info.is_main else None
    monitor = dist.broadcast_object(monitor)
    grid = sample_grid(net, kind, cfg, decode, sigmas).cpu() if info.is_main else None
    metrics = {
        "name": name, "kind": kind, "train_seed": train_seed, "network": str(network),
        "network_sha256": file_sha256(network),
        "nfe": nfe, "teacher_steps": ev["teacher_steps"] if kind == "teacher" else None,
        "label": label or name, "steps": steps if kind == "generator" else ev["teacher_steps"],
        "sigmas": sigmas, "sigma_init": sigmas[0] if sigmas else None,
        "metric": key, "metric_label": extractor.label, "mode": extractor.mode,
        "extractor": extractor.info, "reference": ref.info, "notes": notes,
        "extra_metrics": [{"metric": x.metric_key, "metric_label": x.label, "mode": x.mode, "extractor": x.info,
                           "reference": xref.info} for x, xref in extras],
        "num_runs": ev["num_runs"], "num_samples": ev["num_samples"], "labels": ev["labels"], "latents": ev["latents"],
        "seeds": [[s.start, s.stop - 1] for s in ranges],
        "seed_note": _seed_note(ev["labels"], ev["latents"]),
        "class_conditional": label_dim > 0, "label_dim": label_dim,
        "runs": runs, "summary": summary, "std_ddof": 1, "se_note": "se = std / sqrt(num_runs): of the mean over runs",
        "monitor": monitor,
        "config_hash": config_hash(cfg), "experiment": cfg["experiment"], "world_size": info.world_size,
        "device": str(info.device), "elapsed_s": round(time.time() - t0, 2),
    }
    return metrics, grid


class TrainingMonitor:
    """A quick FD/FID of the generator during distillation (fixed seeds, few samples).

    `TrainingMonitor(cfg, device, dist_info)`; `monitor(generate)` with
    `generate(z [B,C,H,W], labels [B,label_dim] | None) -> images in [-1, 1]` returns
    `{monitor.key: value}` (key 'fd' for the digits classifier, 'fid' for Inception), the same on
    every rank. Lower is better. The extractor and the reference are loaded on first use.
    """

    def __init__(self, cfg: dict, device: torch.device, dist_info: dist.DistInfo) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.info = dist_info
        self.settings = cfg["evaluate"]["during_training"]
        self._extractor: Extractor | None = None
        self._ref: Reference | None = None
        self._decode: Callable | None = None

    @property
    def enabled(self) -> bool:
        """True when `evaluate.during_training.every_kimg` > 0."""
        return float(self.settings["every_kimg"]) > 0

    @property
    def every_kimg(self) -> float:
        """Evaluate every this many kimg (0 = never)."""
        return float(self.settings["every_kimg"])

    @property
    def key(self) -> str:
        """The metric name in the returned dict ('fd' or 'fid')."""
        from .features import resolve_extractor_name

        return "fid" if resolve_extractor_name(self.cfg) == "inception" else "fd"

    def _setup(self) -> None:
        if self._extractor is None:
            d = self.cfg["data"]
            self._extractor = build_extractor(self.cfg, self.device)
            self._extractor.check_images(d["resolution"], d["channels"], "the generator's images")
            self._ref = get_reference(self.cfg, self._extractor, self.info, d["resolution"])
            self._decode = _decode_fn(self.cfg, self.device)

    @torch.no_grad()
    def __call__(self, generate: GenerateFn) -> dict[str, float]:
        """FD/FID of `generate` on `during_training.num_samples` fixed seeds."""
        self._setup()
        if self._decode is not None:
            inner = generate
            generate = lambda z, c: self._decode(inner(z, c))  # noqa: E731
        d, s = self.cfg["data"], self.settings
        seeds = range(s["seed"], s["seed"] + s["num_samples"])
        info = replace(self.info, device=self.device)
        feats, _ = extract_generated(self._extractor, generate, seeds, (d["channels"], d["resolution"], d["resolution"]),
                                     d["label_dim"], self.cfg["evaluate"]["batch"], info, desc="monitor",
                                     want_probs=False, labels=self.cfg["evaluate"]["labels"],
                                     latents=self.cfg["evaluate"]["latents"])
        value = frechet_distance(*feature_stats(feats), self._ref.mu, self._ref.sigma) if info.is_main else 0.0
        return {self.key: float(dist.broadcast_object(value))}
