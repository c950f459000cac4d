"""FID reference statistics: Inception feature mean `mu` (D,) and covariance `sigma` (D, D).

Reads EDM's ``fid-refs/*.npz`` and clean-fid's statistics files (both store ``mu`` and
``sigma``), always with ``allow_pickle=False``, and validates them before any FID is computed
against them: a wrong or damaged file otherwise yields a plausible-looking but meaningless FID.

EDM2's ``img512.pkl`` is a plain pickle ``{fid: {mu, sigma}, fd_dinov2: {mu, sigma}}`` of numpy
arrays; `load_stats_pickle` reads it with an unpickler that can build numpy arrays and plain
containers and nothing else (any other global is refused), so no code from the file runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_write
from ..io.npz import load_npz
from ..errors import DataError, brief_reason


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


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays/scalars and plain containers; refuses every other global."""

    def __init__(self, f: Any, source: str) -> None:
        super().__init__(f)
        from ..io.edm_pickle import _numpy_frombuffer, _numpy_multiarray

        ma = _numpy_multiarray()
        self._source = source
        self._allowed = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            self._allowed[(mod, "_reconstruct")] = ma._reconstruct
            self._allowed[(mod, "scalar")] = ma.scalar
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            self._allowed[(mod, "_frombuffer")] = _numpy_frombuffer()
        self._allowed[("collections", "OrderedDict")] = dict
        self._allowed[("_codecs", "encode")] = lambda text, enc="latin1": text.encode("latin1")

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise DataError(f"refusing to read {self._source}: it references {module}.{name}, which could "
                            f"execute code (a statistics pickle holds only numpy arrays)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to read {self._source}: it uses persistent ids (not a statistics pickle)")


def load_stats_pickle(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (mu, sigma)} from an EDM2 statistics pickle (img512.pkl), validated, float64."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference statistics {path} do not exist: run the fetch stage or set the path")
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnlyUnpickler(io.BufferedReader(f), str(path)).load()
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
