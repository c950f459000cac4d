"""Noise-level helpers of the DMD2 and ADD baselines (`sida.nets.sampler`), against numbers
computed here with plain Python arithmetic in DMD2's own construction order (descending
k-diffusion grid, then flipped), never through the function under test."""

from __future__ import annotations

import pytest
import torch

from sida.nets.sampler import (ADD_STUDENT_STEPS, DMD2_INDEX_RANGE, GRID_STEPS, add_student_sigmas,
                               few_step_generate, karras_grid_sigma, one_step_generate,
                               sample_karras_grid_sigma)


def dmd2_grid(n: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """k-diffusion's get_sigmas_karras (ramp 0..1 from sigma_max to sigma_min), then flipped."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    descending = [(hi + j / (n - 1) * (lo - hi)) ** rho for j in range(n)]
    return descending[::-1]


def test_grid_constants():
    assert GRID_STEPS == 1000
    assert DMD2_INDEX_RANGE == (20, 980)  # int(0.02 * 1000), int(0.98 * 1000)
    assert ADD_STUDENT_STEPS == (999, 749, 499, 249)


def test_karras_grid_matches_dmd2_construction_and_direction():
    ref = dmd2_grid()
    idx = torch.arange(1000)
    got = karras_grid_sigma(idx, dtype=torch.float64)
    assert got.shape == (1000,)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    # small sigma first: index 0 is sigma_min, index 999 is sigma_max, strictly increasing
    assert got[0].item() == pytest.approx(0.002, rel=1e-12)
    assert got[999].item() == pytest.approx(80.0, rel=1e-12)
    assert bool((got[1:] > got[:-1]).all())
    # float32 by default, shape of the index tensor kept
    f32 = karras_grid_sigma(torch.tensor([[20], [980]]))
    assert f32.dtype == torch.float32 and f32.shape == (2, 1)
    assert f32[0, 0].item() == pytest.approx(ref[20], rel=1e-6)
    assert f32[1, 0].item() == pytest.approx(ref[980], rel=1e-6)


def test_karras_grid_rejects_bad_indices():
    with pytest.raises(ValueError):
        karras_grid_sigma(1000)
    with pytest.raises(ValueError):
        karras_grid_sigma(-1)
    with pytest.raises(TypeError):
        karras_grid_sigma(torch.tensor([0.5]))


def test_dmd2_draws_cover_exactly_20_to_980_on_the_grid():
    g = torch.Generator().manual_seed(0)
    lo, hi = DMD2_INDEX_RANGE
    s = sample_karras_grid_sigma(200_000, lo, hi, generator=g)
    assert s.shape == (200_000, 1, 1, 1) and s.dtype == torch.float32
    ref = torch.tensor(dmd2_grid(), dtype=torch.float32)
    # every draw is a grid point; recover its index
    idx = (s.flatten()[:, None] - ref[None, :]).abs().argmin(dim=1)
    assert torch.allclose(ref[idx], s.flatten(), rtol=1e-6, atol=0)
    assert int(idx.min()) == 20 and int(idx.max()) == 980  # both ends inclusive, nothing outside
    counts = torch.bincount(idx, minlength=1000)[20:981].float()
    # uniform over the 961 indices: expected 208 each; 5 sigma ~ 72
    assert (counts - 200_000 / 961).abs().max() < 80
    # the same generator state replays the same draws
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(sample_karras_grid_sigma(200_000, lo, hi, generator=g2), s)


def test_grid_draw_range_is_checked():
    with pytest.raises(ValueError):
        sample_karras_grid_sigma(4, 10, 5)
    with pytest.raises(ValueError):
        sample_karras_grid_sigma(4, 0, 1000)


def test_add_student_sigmas():
    ref = dmd2_grid()
    sig = add_student_sigmas()
    assert sig == pytest.approx([ref[999], ref[749], ref[499], ref[249]], rel=1e-12)
    assert sig[0] == pytest.approx(80.0)  # the generation sigma is the teacher's sigma_max
    assert sig == pytest.approx([80.0, 17.498106, 2.503974, 0.1680835], rel=1e-6)
    # another schedule: sigma_max 1, rho 1 -> linear grid, i/999 of the way from 0.002 to 1
    lin = add_student_sigmas(sigma_min=0.002, sigma_max=1.0, rho=1.0)
    assert lin == pytest.approx([0.002 + k / 999 * (1 - 0.002) for k in (999, 749, 499, 249)], rel=1e-12)


class _ToyDenoiser(torch.nn.Module):
    """D(x, sigma) = x / (1 + sigma) + label offset; records the sigmas it was called with."""

    augment_dim = 0

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[float] = []

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.calls.append(float(sigma[0]))
        assert sigma.shape == (x.shape[0],)
        out = x / (1 + sigma.reshape(-1, 1, 1, 1))
        return out if class_labels is None else out + class_labels.sum(dim=1).reshape(-1, 1, 1, 1)


def test_few_step_generate_one_level_is_one_step_generate():
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    G = _ToyDenoiser()
    assert torch.equal(few_step_generate(G, z, [80.0]), one_step_generate(G, z, sigma_init=80.0))


def test_few_step_generate_renoises_with_fresh_noise_at_each_level():
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    G = _ToyDenoiser()
    out = few_step_generate(G, z, [4.0, 1.0, 0.5], labels, generator=torch.Generator().manual_seed(7))
    assert G.calls == [4.0, 1.0, 0.5]
    # by hand: x0 = 4z/5 + l; x1 = (x0 + 1 e1)/2 + l; x2 = (x1 + 0.5 e2)/1.5 + l
    g = torch.Generator().manual_seed(7)
    e1 = torch.randn(z.shape, generator=g)
    e2 = torch.randn(z.shape, generator=g)
    lab = labels.sum(dim=1).reshape(-1, 1, 1, 1)
    x0 = 4 * z / 5 + lab
    x1 = (x0 + e1) / 2 + lab
    x2 = (x1 + 0.5 * e2) / 1.5 + lab
    assert torch.allclose(out, x2, atol=1e-6)
    with pytest.raises(ValueError):
        few_step_generate(G, z, [])
