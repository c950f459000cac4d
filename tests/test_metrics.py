"""Metric math against closed forms; seeds; the digits classifier's determinism and accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sida.eval.digits_classifier import train_digits_classifier
from sida.eval.features import load_or_train_digits_classifier, state_dict_sha256
from sida.eval.metrics import (fd_from_features, feature_stats, frechet_distance, inception_score,
                          precision_recall)
from sida.eval.noise import balanced_indices, class_counts, latents_for_seeds, seed_ranges, sobol_latents
from sida.io.images import quantize


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_full_covariances_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + np.eye(8), b @ b.T + np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_identical_inputs_give_zero_despite_sqrtm_noise():
    rng = np.random.default_rng(2)
    feats = np.maximum(rng.normal(size=(500, 256)) @ rng.normal(size=(256, 256)), 0)  # rank-deficient-ish
    feats[:, :10] = 0
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert abs(fd_from_features(feats, feats.copy())) < 1e-6


def test_frechet_distance_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_confident_uniform_classifier_is_number_of_classes():
    k = 10
    probs = np.eye(k)[np.arange(1000) % k]
    assert inception_score(probs, num_splits=10)[0] == pytest.approx(k, rel=1e-9)
    assert inception_score(np.full((100, k), 1.0 / k), num_splits=1)[0] == pytest.approx(1.0)


def test_precision_recall_identical_sets_and_disjoint_sets():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8))
    p, r = precision_recall(x, x.copy(), k=3)
    assert p == pytest.approx(1.0) and r == pytest.approx(1.0)
    p, r = precision_recall(x, x + 100.0, k=3)
    assert p == 0.0 and r == 0.0


def test_seed_ranges_disjoint_and_reproducible():
    runs = seed_ranges(7, 4, 100)
    assert runs == seed_ranges(7, 4, 100)
    allseeds = [s for r in runs for s in r]
    assert len(allseeds) == len(set(allseeds)) == 400 and min(allseeds) == 7


def test_latents_depend_only_on_the_seed():
    z, c = latents_for_seeds(range(10), (1, 8, 8), 10)
    z2, c2 = latents_for_seeds(range(5, 10), (1, 8, 8), 10)
    assert torch.equal(z[5:], z2) and torch.equal(c[5:], c2)
    assert c.sum(1).eq(1).all()  # one-hot
    labels = latents_for_seeds(range(2000), (1, 1, 1), 10)[1].argmax(1)
    assert set(labels.tolist()) == set(range(10))  # uniform draws cover every class
    assert latents_for_seeds(range(3), (1, 8, 8), 0)[1] is None


def test_balanced_labels_equal_counts_from_the_seed_alone():
    z_r, c_r = latents_for_seeds(range(30, 50), (1, 8, 8), 10, labels="random")
    z_b, c_b = latents_for_seeds(range(30, 50), (1, 8, 8), 10, labels="balanced")
    assert torch.equal(z_r, z_b)  # the same noise either way: only the labels differ
    assert c_b.argmax(1).tolist() == [s % 10 for s in range(30, 50)]
    # Any batching (here: one seed at a time, in reverse) gives the same labels.
    one = torch.cat([latents_for_seeds([s], (1, 8, 8), 10, labels="balanced")[1] for s in reversed(range(30, 50))])
    assert torch.equal(one.flip(0), c_b)
    # Exactly equal counts in any window whose length is a multiple of the class count.
    assert class_counts(range(1234, 1234 + 2000), (1, 8, 8), 10, "balanced") == [200] * 10
    # Random labels are far from equal at 2,000 samples; counts replay the labels actually drawn.
    counts = class_counts(range(2000), (1, 8, 8), 10, "random")
    drawn = latents_for_seeds(range(2000), (1, 8, 8), 10)[1].sum(0).long().tolist()
    assert counts == drawn and sum(counts) == 2000 and max(counts) - min(counts) > 10
    assert class_counts(range(5), (1, 8, 8), 0, "balanced") is None
    with pytest.raises(ValueError, match="labels"):
        latents_for_seeds(range(3), (1, 8, 8), 10, labels="uniform")


def test_sobol_latents_are_a_randomized_qmc_point_set_per_run_and_class():
    from scipy.stats import norm

    shape, start = (1, 8, 8), 5000
    seeds = range(start, start + 2560)  # 256 per class: a power of two, where Sobol nets are exact
    z, c = latents_for_seeds(seeds, shape, 10, labels="balanced", latents="sobol", run_start=start)
    assert c.argmax(1).tolist() == [s % 10 for s in seeds]  # labels as with iid noise
    # Every 1-D projection of 2^k scrambled Sobol points is stratified: exactly one point in each
    # of the 2^k equal-probability intervals of N(0, 1), in every class and every dimension.
    # Independent draws almost never are (the probability is 256!/256^256).
    for k in (0, 7):
        u = norm.cdf(z[c.argmax(1) == k].reshape(256, -1).double().numpy())
        for d in range(64):
            assert sorted(np.floor(u[:, d] * 256).astype(int).tolist()) == list(range(256)), (k, d)
    iid = latents_for_seeds(range(256), shape, 0)[0].reshape(256, -1).double().numpy()
    assert any(len(set(np.floor(norm.cdf(iid[:, d]) * 256).astype(int))) < 256 for d in range(64))
    # Still standard normal marginally (moments over all 2560 x 64 values).
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_sobol_latents_do_not_depend_on_batching_or_rank():
    shape, start = (1, 8, 8), 200
    full = sobol_latents(range(start, start + 200), start, shape, 10, "balanced")
    # one seed at a time, in reverse; and rank 1 of 3 taking every third sample
    one = torch.cat([sobol_latents([s], start, shape, 10, "balanced") for s in reversed(range(start, start + 200))])
    assert torch.equal(one.flip(0), full)
    assert torch.equal(sobol_latents(range(start + 1, start + 200, 3), start, shape, 10, "balanced"), full[1::3])
    # Another run (another first seed) is another, independent scrambling; so is another class.
    other = sobol_latents(range(400, 600), 400, shape, 10, "balanced")
    assert not torch.equal(other, full) and not torch.equal(full[0], full[1])
    # Unconditional / random labels: one stream per run; the labels are the iid ones.
    z_r, c_r = latents_for_seeds(range(30, 50), shape, 10, labels="random", latents="sobol", run_start=30)
    assert torch.equal(c_r, latents_for_seeds(range(30, 50), shape, 10, labels="random")[1])
    assert torch.equal(z_r, sobol_latents(range(30, 50), 30, shape, 0, "random"))
    with pytest.raises(ValueError, match="run_start"):
        latents_for_seeds(range(3), shape, 10, latents="sobol")
    with pytest.raises(ValueError, match="precedes"):
        sobol_latents([3], 4, shape, 10, "balanced")


def test_sobol_latents_refuse_more_dimensions_than_sobol_has():
    from sida.errors import ConfigError

    with pytest.raises(ConfigError, match="latents: iid"):
        sobol_latents(range(2), 0, (3, 128, 128), 0, "random")


def test_balanced_indices_take_the_rarest_class_count():
    classes = np.array([0, 1, 1, 2, 2, 2, 0, 1, 2, 0, 0])  # counts 4, 3, 4
    idx = balanced_indices(classes, 3)
    assert np.all(np.diff(idx) > 0) and np.bincount(classes[idx]).tolist() == [3, 3, 3]
    assert np.array_equal(idx, balanced_indices(classes, 3))  # deterministic
    assert np.bincount(classes[balanced_indices(classes, 3, per_class=2)]).tolist() == [2, 2, 2]
    from sida.errors import DataError
    with pytest.raises(DataError, match="class 3"):
        balanced_indices(classes, 4)


def test_quantize_matches_edm():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    assert quantize(x).tolist() == [0, 0, 128, 191, 255, 255]


def test_digits_classifier_is_deterministic():
    a, _ = train_digits_classifier(seed=0, epochs=2)
    b, _ = train_digits_classifier(seed=0, epochs=2)
    assert state_dict_sha256(a.state_dict()) == state_dict_sha256(b.state_dict())


def test_digits_classifier_accuracy_and_cache(tmp_path):
    ext = load_or_train_digits_classifier(tmp_path)  # default recipe: 30 epochs
    assert ext.test_accuracy > 0.95
    again = load_or_train_digits_classifier(tmp_path)  # from the cache, hash-checked
    assert again.sha256 == ext.sha256 and again.test_accuracy == ext.test_accuracy
    f, p = ext(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    assert f.shape == (4, 128) and p.shape == (4, 10)
