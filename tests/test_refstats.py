"""FID reference statistics: round trip and validation errors."""

from __future__ import annotations

import numpy as np
import pytest

from sida.errors import DataError
from sida.eval.refstats import load_ref_stats, save_ref_stats


def _stats(d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(64, d))
    return f.mean(0), np.cov(f, rowvar=False)


def test_round_trip_edm_and_cleanfid_layouts(tmp_path):
    mu, sigma = _stats()
    save_ref_stats(tmp_path / "refs.npz", mu, sigma)
    m2, s2 = load_ref_stats(tmp_path / "refs.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["refs.npz"]  # no temp file left behind
    # clean-fid writes float32 with np.savez_compressed: also accepted, returned as float64.
    np.savez_compressed(tmp_path / "cf.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    m3, s3 = load_ref_stats(tmp_path / "cf.npz")
    assert m3.dtype == np.float64 and np.allclose(s3, sigma, atol=1e-5)


@pytest.mark.parametrize("problem,match", [
    ("missing_key", "lack 'mu'/'sigma'"),
    ("shape", "expected \\(16, 16\\)"),
    ("mu_shape", "expected a vector"),
    ("nan", "NaN or infinite"),
    ("asym", "not symmetric"),
    ("garbage", "cannot be read"),
    ("missing", "do not exist"),
])
def test_validation_errors(tmp_path, problem, match):
    mu, sigma = _stats()
    p = tmp_path / "bad.npz"
    if problem == "missing_key":
        np.savez(p, mu=mu)
    elif problem == "shape":
        np.savez(p, mu=mu, sigma=sigma[:8])
    elif problem == "mu_shape":
        np.savez(p, mu=mu[None], sigma=sigma)
    elif problem == "nan":
        sigma[0, 0] = np.nan
        np.savez(p, mu=mu, sigma=sigma)
    elif problem == "asym":
        sigma[0, 1] += 1.0
        np.savez(p, mu=mu, sigma=sigma)
    elif problem == "garbage":
        p.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=match) as info:
        load_ref_stats(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_save_refuses_invalid(tmp_path):
    mu, sigma = _stats()
    with pytest.raises(DataError):
        save_ref_stats(tmp_path / "x.npz", mu, sigma[:, :3])
    assert not list(tmp_path.iterdir())
