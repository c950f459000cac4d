"""FID reference statistics: Inception feature mean `mu` (D,) and covariance `sigma` (D, D).

Reads EDM's ``fid-refs/*.npz`` and clean-fid's statistics files (both store ``mu`` and
``sigma``), always with ``allow_pickle=False``, and validates them before any FID is computed
against them: a wrong or damaged file otherwise yields a plausible-looking but meaningless FID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write
from ..io.npz import load_npz
from ..errors import DataError


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
