"""Sample-quality metrics on feature vectors: Fréchet distance, Inception Score, precision/recall.

Pure functions of arrays, so they are tested against closed forms. The feature extractor that
produces the vectors lives in `sida.eval.features`; the sampling loop in `sida.eval.extract`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["feature_stats", "frechet_distance", "fd_from_features", "inception_score", "precision_recall"]


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of `features` [N, D] in float64, as EDM's fid.py."""
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    x = x.astype(np.float64, copy=False)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape [N, D], got {x.shape}")
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (via eigh)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) between N(mu1, S1) and N(mu2, S2).

    Tr (S1 S2)^½ is computed as Σ sqrt(eig(S1^½ S2 S1^½)): that matrix is symmetric PSD and has
    the eigenvalues of S1 S2, so `eigh` replaces scipy's general `sqrtm` (which is slower, can
    return complex noise and is inaccurate on the rank-deficient covariances of small samples).
    Identical inputs give 0 up to ~1e-12 relative error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    # Round-off can leave a tiny negative number for identical statistics.
    return max(d, 0.0)


def fd_from_features(feats1: np.ndarray | torch.Tensor, feats2: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


def inception_score(probs: np.ndarray | torch.Tensor, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) from class probabilities [N, K].

    As in the papers (and StyleGAN2-ADA's metric): the N samples are cut into `num_splits`
    consecutive splits, IS is computed per split, and the mean and std over splits returned.
    A perfectly confident classifier whose predictions are uniform over K classes gives K.
    """
    p = probs.detach().cpu().double().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float64)
    n = p.shape[0]
    num_splits = max(1, min(num_splits, n))
    scores = []
    for i in range(num_splits):
        part = p[i * n // num_splits:(i + 1) * n // num_splits]
        py = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: mask instead of adding an epsilon that would bias confident outputs.
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row (the row itself is at 0)."""
    out = []
    for i in range(0, x.shape[0], batch):
        d = torch.cdist(x[i:i + batch], x)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of `query` rows inside at least one ball (support_j, radii_j)."""
    hit = 0
    for i in range(0, query.shape[0], batch):
        d = torch.cdist(query[i:i + batch], support)
        hit += int((d <= radii[None, :]).any(dim=1).sum())
    return hit / query.shape[0]


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     batch: int = 1024, device: torch.device | str | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, k = 3.

    Precision: fraction of fake samples inside the real manifold (union of balls around each real
    feature reaching its k-th nearest real neighbour); recall: the same with roles swapped.
    Distances in float32 on `device`, in row batches so 50k x 50k never sits in memory at once.
    """
    dev = torch.device(device) if device is not None else None
    r = torch.as_tensor(np.asarray(real) if not isinstance(real, torch.Tensor) else real, dtype=torch.float32)
    f = torch.as_tensor(np.asarray(fake) if not isinstance(fake, torch.Tensor) else fake, dtype=torch.float32)
    if dev is not None:
        r, f = r.to(dev), f.to(dev)
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r_radii = _kth_radii(r, k, batch)
    f_radii = _kth_radii(f, k, batch)
    precision = _coverage(f, r, r_radii, batch)
    recall = _coverage(r, f, f_radii, batch)
    return precision, recall
