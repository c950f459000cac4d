"""DMD and ADD's distillation term in the analytic Gaussian case, through a small self-contained
driver of the pure pieces (`sida.train.baselines`, `sida.train.losses`, `sida.nets.sampler`).

As in test_sid_gaussian.py (whose toy networks are reused): data N(mu, s^2 I) on 1x4x4 images,
the teacher is the exact EDM denoiser D(x, sigma) = mu + c (x - mu), c = s^2 / (s^2 + sigma^2),
and the fake score the exact denoiser of N(m, s^2 I) with a learnable mean m.
- DMD: the generator is the shift x_g = s z + b from G(80 z, 80) (DMD2's generation sigma). Its
  distribution equals the data's iff b = mu. Here y_fake - y_real = (1 - c)(m - mu), so the DMD
  gradient pushes b towards mu once the fake score has learned m ~ b.
- ADD: the student sees a real image noised at one of ADD's four levels, x_s = x0 + sigma_s eps,
  and outputs x_hat = s x_s / sqrt(s^2 + sigma_s^2) + b_level (one learnable shift per level, so
  each level can match on its own). E[x_hat - D(x_hat + sigma_t eps')] = (1 - c_t)(E x_hat - mu):
  the distillation term drives E[x_hat | level] to mu, i.e. b_level to
  mu (1 - s / sqrt(s^2 + sigma_level^2)), for either weighting.
A sign-flipped loss must move the shifts away: the tests can fail.
The loop integration (a later round) repeats these through `sida.train.distill`.
"""

from __future__ import annotations

import pytest
import torch

from sida.nets.sampler import (DMD2_INDEX_RANGE, add_student_sigmas, karras_grid_sigma, one_step_generate,
                               sample_karras_grid_sigma)
from sida.train.baselines import (add_distill_term, add_student_sigma, dmd_term, fake_score_term, generator_turn,
                                  make_optimizer)
from sida.train.losses import (add_generator_objective, dmd2_critic_objective, dmd2_generator_objective, dmd_gradient,
                               sid_generator_loss)
from test_sid_gaussian import MU, S, SHAPE, GaussDenoiser, ShiftGenerator

BATCH = 16


def _dmd_run(iters: int, warmup: int = 40, ratio: int = 1, sign: float = 1.0, seed: int = 0):
    """DMD (DMD2 without its GAN term): critic every iteration, generator every `ratio`-th."""
    teacher, fake, G = GaussDenoiser(MU, learnable=False), GaussDenoiser(MU, learnable=True), ShiftGenerator()
    opt_g = make_optimizer(G.parameters(), "adam", lr=0.01)
    opt_f = make_optimizer(fake.parameters(), "adam", lr=0.03)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = DMD2_INDEX_RANGE
    history = []
    for it in range(warmup + iters):
        z = torch.randn(BATCH, *SHAPE, generator=gen)
        x_g = one_step_generate(G, z, sigma_init=80.0)
        if it >= warmup and generator_turn(it * BATCH, BATCH, ratio):
            sigma = sample_karras_grid_sigma(BATCH, lo, hi, generator=gen)
            eps = torch.randn(x_g.shape, generator=gen)
            opt_g.zero_grad()
            (sign * dmd2_generator_objective(dmd_term(teacher, fake, x_g, sigma, eps, None), None, BATCH)).backward()
            opt_g.step()
        sigma_f = sample_karras_grid_sigma(BATCH, 0, 999, generator=gen)
        eps_f = torch.randn(x_g.shape, generator=gen)
        opt_f.zero_grad()
        dmd2_critic_objective(fake_score_term(fake, x_g, sigma_f, eps_f, None), None, BATCH).backward()
        opt_f.step()
        history.append(G.b.detach().clone())
    return G.b.detach(), fake.mean.detach(), history


def test_dmd_gradient_in_the_gaussian_case_by_formula():
    """g = (y_fake - y_real) / wf = (1 - c)(m - mu) / mean|x_g - D_teacher(x_t)| per pixel."""
    teacher, fake = GaussDenoiser(MU, learnable=False), GaussDenoiser(torch.zeros_like(MU), learnable=False)
    gen = torch.Generator().manual_seed(2)
    x_g = (S * torch.randn(3, *SHAPE, generator=gen)).requires_grad_(True)
    sigma = karras_grid_sigma(torch.tensor([20, 500, 980])).reshape(-1, 1, 1, 1)
    eps = torch.randn(x_g.shape, generator=gen)
    dmd_term(teacher, fake, x_g, sigma, eps, None).sum().backward()
    c = S ** 2 / (S ** 2 + sigma ** 2)
    x_t = x_g.detach() + sigma * eps
    wf = (x_g.detach() - (MU + c * (x_t - MU))).abs().mean(dim=(1, 2, 3), keepdim=True)
    # float32: 1 - c at index 20 (c = 0.99996) keeps only ~3 significant digits
    assert torch.allclose(x_g.grad, (1 - c) * (0 - MU) / wf, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.5, 1.2])
def test_sid_gradient_through_the_networks_is_one_minus_c_times_dmds(alpha):
    """SiD's loop does not detach the denoisers: gradients also flow through x_t = x_g + sigma eps.
    For these Gaussian denoisers (equal covariances) y_real - y_fake = (1 - c)(mu - m) does not
    depend on x_t and dy/dx_t = c I, so d/dx_g sum(L_sid) = -(1 - c)(y_real - y_fake) / wf = (1 - c) g:
    equal to DMD's gradient only where c -> 0 (large sigma), for every alpha."""
    teacher, fake = GaussDenoiser(MU, learnable=False), GaussDenoiser(torch.zeros_like(MU), learnable=False)
    gen = torch.Generator().manual_seed(4)
    x_g = (S * torch.randn(3, *SHAPE, generator=gen)).requires_grad_(True)
    sigma = torch.tensor([0.3, 1.0, 3.0]).reshape(-1, 1, 1, 1)
    x_t = x_g + sigma * torch.randn(x_g.shape, generator=gen)
    y_real, y_fake = teacher(x_t, sigma.flatten()), fake(x_t, sigma.flatten())
    sid_generator_loss(y_real, y_fake, x_g, alpha).sum().backward()
    c = S ** 2 / (S ** 2 + sigma ** 2)
    g = dmd_gradient(y_real, y_fake, x_g)
    assert torch.allclose(x_g.grad, (1 - c) * g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ratio", [1, 5])
def test_dmd_moves_generator_shift_to_data_mean(ratio):
    iters = 300 * ratio
    b, m, history = _dmd_run(iters, ratio=ratio)
    # during the critic-only warm-up the generator does not move, the fake score learns N(0, s^2)
    assert torch.equal(history[39], torch.zeros_like(b))
    # early generator steps move every pixel towards mu (> 0)
    assert (history[40 + 10 * ratio] > 0).all(), history[40 + 10 * ratio]
    err_mean = (b.mean() - MU.mean()).abs().item()
    err_max = (b - MU).abs().max().item()
    # seeds 0-3 (ratio 1) and seed 0 (ratio 5): mean errors <= 0.005, per-pixel <= 0.042
    assert err_mean < 0.02 * MU.mean().item(), (err_mean, b)
    assert err_max < 0.1, (err_max, b)
    assert (m - b).abs().max() < 0.2  # the fake score tracked the generator


def test_dmd_sign_flipped_moves_away():
    b, _, _ = _dmd_run(60, sign=-1.0)
    assert (b < 0).all() and b.mean() < -0.2, b


class LevelShiftStudent(torch.nn.Module):
    """x_hat = S x / sqrt(S^2 + sigma^2) + b[level], level = the student level whose sigma is given."""

    img_channels, img_resolution, label_dim = SHAPE[0], SHAPE[1], 0

    def __init__(self, sigmas: list[float]) -> None:
        super().__init__()
        self.register_buffer("sigmas", torch.tensor(sigmas))
        self.b = torch.nn.Parameter(torch.zeros(len(sigmas), *SHAPE))

    def forward(self, x, sigma, class_labels=None, **_):
        sigma = sigma.reshape(-1)
        level = (sigma[:, None] - self.sigmas[None, :]).abs().argmin(dim=1)
        s4 = sigma.reshape(-1, 1, 1, 1)
        return S * x / (S ** 2 + s4 ** 2).sqrt() + self.b[level]


def _add_run(iters: int, weighting: str = "exponential", sign: float = 1.0, seed: int = 0):
    """ADD's distillation term alone (no discriminator): real x0 -> student level -> x_hat."""
    sigmas = add_student_sigmas()
    teacher, G = GaussDenoiser(MU, learnable=False), LevelShiftStudent(sigmas)
    opt = make_optimizer(G.parameters(), "adam", lr=0.02)
    gen = torch.Generator().manual_seed(seed)
    for it in range(iters):
        if it == iters * 3 // 4:  # a smaller last step shrinks Adam's jitter around the fixed point
            opt.param_groups[0]["lr"] = 0.004
        x0 = MU + S * torch.randn(BATCH, *SHAPE, generator=gen)
        level = torch.randint(len(sigmas), (BATCH,), generator=gen)
        sigma_s = add_student_sigma(level, sigmas)
        x_hat = G(x0 + sigma_s * torch.randn(x0.shape, generator=gen), sigma_s.flatten())
        sigma_t = sample_karras_grid_sigma(BATCH, 0, 999, generator=gen)
        eps_t = torch.randn(x0.shape, generator=gen)
        l_distill = add_distill_term(teacher, x_hat, sigma_t, eps_t, None, weighting)
        opt.zero_grad()
        (sign * add_generator_objective(None, l_distill, BATCH)).backward()
        opt.step()
    return G.b.detach(), torch.tensor(sigmas)


@pytest.mark.parametrize("weighting", ["exponential", "sds"])
def test_add_distillation_moves_each_levels_mean_to_data_mean(weighting):
    b, sigmas = _add_run(400, weighting)
    keep = (S / (S ** 2 + sigmas ** 2).sqrt()).reshape(-1, 1, 1, 1)  # how much of x0 survives into x_hat
    mean_out = b + keep * MU  # E[x_hat | level]
    err = mean_out - MU
    # seeds 0-3 gave per-level mean errors within 0.03 and per-pixel errors within 0.12
    assert err.mean(dim=(1, 2, 3)).abs().max() < 0.04, (err.mean(dim=(1, 2, 3)), weighting)
    assert err.abs().max() < 0.15, (err.abs().max(), weighting)
    assert torch.allclose(b, MU * (1 - keep), atol=0.15)  # b_level = mu (1 - keep_level)
    # level 0 is the generation level (sigma 80): it keeps almost nothing of x0 (keep 0.006),
    # so one-step samples G(80 z, 80) have mean b_0 ~ mu
    assert sigmas[0] == pytest.approx(80.0) and keep[0].item() < 0.01


def test_add_distillation_sign_flipped_moves_away():
    b, sigmas = _add_run(100, sign=-1.0)
    keep = (S / (S ** 2 + sigmas ** 2).sqrt()).reshape(-1, 1, 1, 1)
    # E[x_hat | level] - mu starts at (keep - 1) mu (about -0.99, -0.97, -0.80, -0.05 on average)
    # and runs further away at every level
    err0 = ((keep - 1) * MU).mean(dim=(1, 2, 3))
    err = (b + keep * MU - MU).mean(dim=(1, 2, 3))
    assert (err < err0 - 0.08).all() and (err[:3] < -1.2).all(), (err0, err)
