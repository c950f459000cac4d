"""The fake score's input augmentation (`sida.train.augment`): each transform against a case worked
out by hand, EDM's 9-label layout, the probability of every transform over many draws, p = 0 is
the identity, and every draw comes from the generator the caller passes."""

from __future__ import annotations

import math

import pytest
import torch

from sida.train import augment as A

N, C, H, W = 3, 2, 8, 8


def images(seed: int = 0, n: int = N, size: int = H) -> torch.Tensor:
    return torch.randn(n, C, size, size, generator=torch.Generator().manual_seed(seed))


def params(n: int = 1, **values) -> A.Params:
    """Hand-set parameters; everything not given is off."""
    out = {k: torch.zeros(n) for k in ("w_scale", "angle", "w_aniso", "r", "tx", "ty")}
    out.update(xflip=torch.zeros(n, dtype=torch.bool), yflip=torch.zeros(n, dtype=torch.bool))
    for k, v in values.items():
        out[k] = torch.as_tensor(v, dtype=out[k].dtype).expand(n).clone()
    return A.Params(**out)


def apply(x: torch.Tensor, prm: A.Params) -> torch.Tensor:
    """What AugmentPipe.__call__ does with drawn parameters (flips, then the geometric warp)."""
    n = x.shape[0]
    x = torch.where(prm.xflip.view(n, 1, 1, 1), x.flip(3), x)
    x = torch.where(prm.yflip.view(n, 1, 1, 1), x.flip(2), x)
    return A.warp(x, prm.matrix(x.shape[2], x.shape[3]))


def blob(size: int, cx: float, cy: float, width: float) -> torch.Tensor:
    """A smooth test image f(x, y) = exp(-|p - c|^2 / 2 width^2) on the pixel grid, [1, 1, size, size]."""
    i = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width ** 2))[None, None]


# -- the resampling filter ------------------------------------------------------------------------

def test_sym6_is_orthonormal_under_double_shifts():
    h = torch.tensor(A.SYM6, dtype=torch.float64)
    assert len(A.SYM6) == 12
    assert (h * h).sum().item() == pytest.approx(1.0, abs=1e-12)
    assert h.sum().item() == pytest.approx(math.sqrt(2), abs=1e-12)  # a low-pass filter
    for j in range(1, 6):
        assert abs((h[:-2 * j] * h[2 * j:]).sum().item()) < 1e-12, j


def test_identity_transform_is_exact():
    x = images()
    out = A.warp(x, torch.eye(3).repeat(N, 1, 1))
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=2e-5)


# -- each transform against a hand-computed case --------------------------------------------------

def test_xflip_and_yflip_by_hand():
    x = images()
    out = apply(x, A.Params(xflip=torch.tensor([True, False, True]), yflip=torch.tensor([False, True, True]),
                            **{k: torch.zeros(N) for k in ("w_scale", "angle", "w_aniso", "r", "tx", "ty")}))
    for r in range(H):
        for c in range(W):
            torch.testing.assert_close(out[0, :, r, c], x[0, :, r, W - 1 - c], rtol=0, atol=2e-5)
            torch.testing.assert_close(out[1, :, r, c], x[1, :, H - 1 - r, c], rtol=0, atol=2e-5)
            torch.testing.assert_close(out[2, :, r, c], x[2, :, H - 1 - r, W - 1 - c], rtol=0, atol=2e-5)


def _reflect(i: int, n: int) -> int:
    """Reflect padding's index rule (edge pixel not repeated): -1 -> 1, n -> n - 2."""
    if i < 0:
        return -i
    if i > n - 1:
        return 2 * (n - 1) - i
    return i


@pytest.mark.parametrize("dx,dy", [(1, -2), (-3, 1), (0, 4)])
def test_integer_translation_by_hand(dx, dy):
    """A translation by whole pixels moves the content exactly (the borders pull in the reflection):
    out[r, c] = in[r - dy, c - dx]. The labels hold the shift in units of 0.125 x the image size."""
    x = images(1)
    tx, ty = dx / (W * A.TRANSLATE_STD), dy / (H * A.TRANSLATE_STD)
    prm = params(N, tx=tx, ty=ty)
    out = apply(x, prm)
    for r in range(H):
        for c in range(W):
            torch.testing.assert_close(out[:, :, r, c], x[:, :, _reflect(r - dy, H), _reflect(c - dx, W)],
                                       rtol=0, atol=5e-5)
    torch.testing.assert_close(prm.labels()[0], torch.tensor([0, 0, 0, 0, 0, 0, 0, tx, ty]))


@pytest.mark.parametrize("size", [16, 32])
def test_quarter_turn_by_hand(size):
    """angle = pi/2: out(p) = in(R p) with R = [[0, -1], [1, 0]] in centred coordinates, i.e.
    out[r, c] = in[c, size - 1 - r]. sym6 is only nearly symmetric, so a transform that mirrors an
    axis is exact to ~1% on a smooth image (the other direction, or a wrong centre, is off by ~1)."""
    x = blob(size, 0.3 * size, 0.6 * size, size / 6)
    out = apply(x, params(1, angle=math.pi / 2))
    expected = torch.empty_like(x)
    for r in range(size):
        for c in range(size):
            expected[..., r, c] = x[..., c, size - 1 - r]
    err = (out - expected).abs().max().item()
    assert err < 0.03, err
    assert (out - expected.flip(2).flip(3)).abs().max() > 0.5  # the opposite turn is far off
    torch.testing.assert_close(params(1, angle=math.pi / 2).labels()[0],
                               torch.tensor([0, 0, 0, -1.0, 1.0, 0, 0, 0, 0]), rtol=0, atol=1e-7)


def test_any_geometric_transform_samples_the_inverse_map():
    """For a band-limited image, out(p) = in(G_inv p) for scaling, rotation, anisotropy and
    translation together (checked in the interior, away from the reflected border)."""
    size, width = 32, 4.0
    cx, cy = 15.5 + 1.3, 15.5 - 2.1          # blob centre in pixel indices
    x = blob(size, cx, cy, width)
    prm = params(1, w_scale=0.7, angle=0.4, w_aniso=-0.9, r=1.1, tx=0.3, ty=-0.2)
    out = apply(x, prm)
    g_inv = prm.matrix(size, size)[0]
    i = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(i - 15.5, i - 15.5, indexing="ij")     # centred output coordinates
    src = g_inv @ torch.stack([xx.flatten(), yy.flatten(), torch.ones(size * size)])
    xs, ys = src[0] + 15.5, src[1] + 15.5                          # input pixel indices
    expected = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * width ** 2)).reshape(size, size)
    inner = slice(8, 24)
    err = (out[0, 0, inner, inner] - expected[inner, inner]).abs().max().item()
    assert err < 0.02, err
    # the same check with G_inv replaced by its inverse (the wrong direction) fails
    wrong = torch.linalg.inv(g_inv) @ torch.stack([xx.flatten(), yy.flatten(), torch.ones(size * size)])
    wrong_img = torch.exp(-((wrong[0] + 15.5 - cx) ** 2 + (wrong[1] + 15.5 - cy) ** 2) / (2 * width ** 2))
    assert (out[0, 0, inner, inner] - wrong_img.reshape(size, size)[inner, inner]).abs().max() > 0.1


def test_scale_rotation_translation_matrices_by_hand():
    # w_scale 5 -> s = 2^(0.2*5) = 2: the output samples the input at p / 2 (content magnified)
    torch.testing.assert_close(params(1, w_scale=5.0).matrix(H, W)[0], torch.diag(torch.tensor([0.5, 0.5, 1.0])))
    c, s = math.cos(0.3), math.sin(0.3)
    torch.testing.assert_close(params(1, angle=0.3).matrix(H, W)[0],
                               torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
    # tx 1 -> a shift of 0.125 * 8 = 1 pixel to the right: out(p) = in(p - (1, 0))
    torch.testing.assert_close(params(1, tx=1.0, ty=-2.0).matrix(H, W)[0],
                               torch.tensor([[1, 0, -1.0], [0, 1, 2.0], [0, 0, 1]]))
    # anisotropy w 5 along the x axis (r = 0): x magnified 2x, y shrunk 2x
    torch.testing.assert_close(params(1, w_aniso=5.0).matrix(H, W)[0], torch.diag(torch.tensor([0.5, 2.0, 1.0])))


# -- the 9 labels ----------------------------------------------------------------------------------

def test_label_layout_by_hand():
    prm = params(1, xflip=True, w_scale=0.5, angle=math.pi / 3, w_aniso=-1.5, r=math.pi / 4, tx=0.3, ty=-0.7)
    expected = [1.0, 0.0, 0.5, math.cos(math.pi / 3) - 1, math.sin(math.pi / 3),
                -1.5 * math.cos(math.pi / 4), -1.5 * math.sin(math.pi / 4), 0.3, -0.7]
    labels = prm.labels()
    assert labels.shape == (1, A.AUGMENT_DIM) == (1, 9) and labels.dtype == torch.float32
    torch.testing.assert_close(labels[0], torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(params(1, yflip=True).labels()[0], torch.tensor([0, 1.0, 0, 0, 0, 0, 0, 0, 0]))


def test_pipe_labels_match_what_it_did():
    """Over real draws: the labels say which flips happened and the geometric part is identity
    exactly where the labels say nothing else happened."""
    pipe = A.AugmentPipe(0.5)
    x = images(2, n=64)
    g = torch.Generator().manual_seed(5)
    out, labels = pipe(x, g)
    prm = A.draw(64, 0.5, torch.Generator().manual_seed(5), "cpu")
    torch.testing.assert_close(labels, prm.labels())
    flipped = torch.where(prm.xflip.view(-1, 1, 1, 1), x.flip(3), x)
    flipped = torch.where(prm.yflip.view(-1, 1, 1, 1), flipped.flip(2), flipped)
    plain = (labels[:, 2:] == 0).all(dim=1)
    assert 0 < plain.sum() < 64
    torch.testing.assert_close(out[plain], flipped[plain], rtol=0, atol=5e-5)
    assert (out[~plain] - flipped[~plain]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


# -- probabilities over many draws ------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.3, 1.0, 0.01])
def test_probability_of_each_transform(p):
    n = 40_000
    prm = A.draw(n, p, torch.Generator().manual_seed(7), "cpu")
    lab = prm.labels()
    tol = 4 * math.sqrt(0.25 / n) + 1e-3
    # xflip: multiplier 1e8 -> always eligible, then a fair coin, whatever p is
    assert lab[:, 0].mean().item() == pytest.approx(0.5, abs=tol)
    # yflip: eligible with probability p, then a fair coin
    assert lab[:, 1].mean().item() == pytest.approx(p / 2, abs=tol)
    # scale, rotation, anisotropy, translation: each applied with probability p
    for name, cols in [("scale", [2]), ("rotation", [3, 4]), ("aniso", [5, 6]), ("translation", [7, 8])]:
        applied = (lab[:, cols] != 0).any(dim=1).float().mean().item()
        assert applied == pytest.approx(p, abs=tol), name
    # translation: one gate for both axes
    assert ((lab[:, 7] != 0) == (lab[:, 8] != 0)).all()
    # the anisotropy axis is rotated in half of the draws, independently of the gate
    assert (prm.r != 0).float().mean().item() == pytest.approx(0.5, abs=tol)
    if p == 1.0:  # the laws of the applied values
        assert prm.w_scale.std().item() == pytest.approx(1.0, abs=0.03)
        assert prm.angle.abs().max().item() <= math.pi
        assert prm.angle.abs().mean().item() == pytest.approx(math.pi / 2, abs=0.03)  # U(-pi, pi)
        assert prm.tx.std().item() == pytest.approx(1.0, abs=0.03)


# -- p = 0, and the random streams ------------------------------------------------------------------

def test_p_zero_is_the_identity_and_draws_nothing():
    x = images()
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    out, labels = A.AugmentPipe(0.0)(x, g)
    assert torch.equal(out, x)
    assert labels.shape == (N, 9) and not labels.any()
    assert torch.equal(g.get_state(), before)
    # and p = 0 inside `draw` gives no transform but the always-eligible x-flip
    lab = A.draw(1000, 0.0, torch.Generator().manual_seed(0), "cpu").labels()
    assert not lab[:, 1:].any()


def test_draws_come_from_the_given_generator_only():
    pipe, x = A.AugmentPipe(0.4), images(4, n=16)
    global_state = torch.get_rng_state()
    a = pipe(x, torch.Generator().manual_seed(11))
    b = pipe(x, torch.Generator().manual_seed(11))
    c = pipe(x, torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_bad_probability_or_unknown_transform_is_refused():
    with pytest.raises(ValueError):
        A.AugmentPipe(1.5)
    with pytest.raises(ValueError):
        A.AugmentPipe(0.1, {"brightness": 1.0})
