"""The digits classifier: a small CNN trained by us on scikit-learn's digits, the feature network
of the embedded default, where nothing may be downloaded ("FD (digits classifier)", not FID).

Trained deterministically (a fixed split, seed and thread count), so the same recipe gives the
same weights and hash on any machine; `sida.eval.features` caches it by a hash of its recipe and
wraps it as an extractor.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CLASSIFIER_RECIPE", "DigitsCNN", "digits_uint8", "train_digits_classifier"]

CLASSIFIER_RECIPE = {"arch": "DigitsCNN-v1", "split": "stratified-25%-rs0", "optimizer": "adam", "lr": 1e-3,
                     "batch": 64, "threads": 1, "input": "uint8/127.5-1"}


class DigitsCNN(torch.nn.Module):
    """A small CNN for 8x8x1 digits: three 3x3 convs, a 128-d penultimate layer, 10 logits."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),   # 4x4
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 2x2
            torch.nn.Flatten(), torch.nn.Linear(512, 128), torch.nn.ReLU())
        self.head = torch.nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float images in [-1, 1], [N, 1, 8, 8] -> (penultimate features, logits)."""
        f = self.body(x)
        return f, self.head(f)


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images [N, 1, 8, 8] (0..16 -> 0..255) and labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # Same mapping as quantize() of the [-1, 1] data: v/8 - 1 -> (x*127.5 + 128) truncated.
    x = np.clip(np.floor(d.images.astype(np.float64) * 15.9375 + 0.5), 0, 255).astype(np.uint8)
    return x[:, None], d.target.astype(np.int64)


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count + deterministic algorithms, restored afterwards: the classifier's
    training is thread-count sensitive (reductions change order), so it must not depend on the
    caller's setting."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def train_digits_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitsCNN, float]:
    """Train `DigitsCNN` on a fixed stratified 75% of the digits; return it (CPU, eval) and its
    accuracy on the other 25% (450 images). Deterministic: same seed, same weights, same hash."""
    from sklearn.model_selection import train_test_split

    x, y = digits_uint8()
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    xt = torch.from_numpy(x).float() / 127.5 - 1
    yt = torch.from_numpy(y)
    # fork_rng: training may happen inside a distillation run (the monitor's first call), whose
    # global RNG stream must not move; enable_grad: the caller may be under no_grad.
    with _deterministic(CLASSIFIER_RECIPE["threads"]), torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        net = DigitsCNN()
        opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_RECIPE["lr"])
        gen = torch.Generator().manual_seed(seed)
        tr = torch.from_numpy(idx_train)
        b = CLASSIFIER_RECIPE["batch"]
        net.train()
        for _ in range(epochs):
            perm = tr[torch.randperm(len(tr), generator=gen)]
            for i in range(0, len(perm), b):
                j = perm[i:i + b]
                _, logits = net(xt[j])
                loss = F.cross_entropy(logits, yt[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval().requires_grad_(False)
        with torch.no_grad():
            te = torch.from_numpy(idx_test)
            acc = float((net(xt[te])[1].argmax(1) == yt[te]).float().mean())
    return net, acc
