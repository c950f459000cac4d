"""Reference statistics: the Fréchet distance's real-image side, mean `mu` (D,) and covariance
`sigma` (D, D) of a feature network's features.

- Files: EDM's ``fid-refs/*.npz`` and clean-fid's statistics files (both store ``mu`` and
  ``sigma``), always read with ``allow_pickle=False`` and validated before any FID is computed
  against them: a wrong or damaged file otherwise yields a plausible-looking but meaningless FID.
  EDM2's ``img512.pkl`` is a plain pickle ``{fid: {mu, sigma}, fd_dinov2: {mu, sigma}}`` of numpy
  arrays; `load_stats_pickle` reads it with `sida.io.safe_unpickle.NumpyOnlyUnpickler`, so no
  code from the file runs.
- `get_reference`: the statistics the config names, from such a file or computed from the
  dataset once and cached (keyed by the dataset config and the extractor's hash), checked
  against the extractor and the resolution; `reference_indices`: the real images behind computed
  statistics (class-balanced with balanced labels, so real and generated sets have the same
  class proportions).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AssetError, DataError, brief_reason
from ..io.atomic import atomic_write
from ..io.npz import load_npz
from ..io.safe_unpickle import NumpyOnlyUnpickler
from ..run import dist
from .extract import dataset_features
from ..run.config import resolve_extractor_name
from .features import Extractor, cache_dir
from ..io.assets import sha256_file
from .metrics import feature_stats
from .noise import balanced_indices

__all__ = ["validate_ref_stats", "load_ref_stats", "save_ref_stats", "PICKLE_METRICS", "load_stats_pickle",
           "Reference", "reference_indices", "resolve_reference", "get_reference"]


def validate_ref_stats(mu: np.ndarray, sigma: np.ndarray, source: str = "reference statistics") -> None:
    """Raise `DataError` unless mu is (D,), sigma (D, D), both finite and sigma symmetric."""
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise DataError(f"{source}: 'mu' has shape {list(mu.shape)}, expected a vector (D,)")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise DataError(f"{source}: 'sigma' has shape {list(sigma.shape)}, expected ({d}, {d}) to match 'mu'")
    if not np.issubdtype(mu.dtype, np.floating) or not np.issubdtype(sigma.dtype, np.floating):
        raise DataError(f"{source}: 'mu'/'sigma' must be floating point, not {mu.dtype}/{sigma.dtype}")
    if not np.isfinite(mu).all() or not np.isfinite(sigma).all():
        raise DataError(f"{source}: 'mu' or 'sigma' contains NaN or infinite values")
    # Relative tolerance: covariances of 2048-d Inception features hold values up to ~1e1.
    scale = max(float(np.abs(sigma).max()), 1e-12)
    if float(np.abs(sigma - sigma.T).max()) > 1e-5 * scale:
        raise DataError(f"{source}: 'sigma' is not symmetric, so it is not a covariance matrix")


def load_ref_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate (mu, sigma) as float64 from an EDM fid-refs or clean-fid `.npz`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"reference statistics {path} do not exist: run the fetch stage or set the path")
    arrays = load_npz(path, "reference statistics", "download them again (run the fetch stage) or fix the path")
    if not {"mu", "sigma"} <= arrays.keys():
        raise DataError(f"reference statistics {path} lack 'mu'/'sigma' (keys: "
                        f"{', '.join(sorted(arrays)) or 'none'}): is it an FID statistics file?")
    mu, sigma = np.asarray(arrays["mu"]), np.asarray(arrays["sigma"])
    validate_ref_stats(mu, sigma, f"reference statistics {path}")
    return mu.astype(np.float64), sigma.astype(np.float64)


def save_ref_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Validate and write (mu, sigma) to `path` as an uncompressed `.npz`, atomically."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    validate_ref_stats(mu, sigma, f"statistics for {path}")
    with atomic_write(path) as tmp:
        # A file object, so numpy does not append '.npz' to the temporary name.
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)


# Metric names in EDM2's statistics pickles -> the extractor that computes them here.
PICKLE_METRICS = {"fid": "inception", "fd_dinov2": "dinov2"}


def load_stats_pickle(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (mu, sigma)} from an EDM2 statistics pickle (img512.pkl), validated, float64."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference statistics {path} do not exist: run the fetch stage or set the path")
    try:
        with open(path, "rb") as f:
            raw = NumpyOnlyUnpickler(io.BufferedReader(f), str(path)).load()
    except DataError:
        raise
    except Exception as exc:  # truncation and corruption surface as many exception types
        raise DataError(f"reference statistics {path} cannot be read: it is corrupt or not a statistics pickle "
                        f"({brief_reason(exc)}): download them again") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"reference statistics {path} are not a dict of metrics (expected {{fid: {{mu, sigma}}, ...}})")
    out = {}
    for metric, stats in raw.items():
        if not isinstance(stats, dict) or not {"mu", "sigma"} <= set(stats):
            raise DataError(f"reference statistics {path}: entry '{metric}' lacks mu/sigma")
        mu, sigma = np.asarray(stats["mu"]), np.asarray(stats["sigma"])
        validate_ref_stats(mu, sigma, f"reference statistics {path} ({metric})")
        out[str(metric)] = (mu.astype(np.float64), sigma.astype(np.float64))
    return out


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
    ref.sha256 = sha256_file(path)
    return ref


def resolve_reference(cfg: dict) -> str:
    """'dataset' or the path of a statistics file, from `evaluate.reference` ('auto' looks at fetch)."""
    ref = cfg["evaluate"]["reference"]
    if ref != "auto":
        return ref
    assets = (cfg.get("fetch") or {}).get("assets") or []
    if any(isinstance(a, dict) and a.get("kind") == "refstats" for a in assets):
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
        mu, sigma = load_ref_stats(which)
        z = load_npz(which, "reference statistics", "download them again (run the fetch stage) or fix the path")
        res = int(z["resolution"]) if "resolution" in z else None
        ref = Reference(mu, sigma, "file", str(which), sha256_file(which), None, res)
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
