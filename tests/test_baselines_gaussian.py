"""DMD and ADD's distillation term in the analytic Gaussian case, through the real loop
(`sida.train.loop.DistillLoop`: its phases, slot streams, optimisers, turns and EMA).

As in test_sid_gaussian.py (whose toy networks are reused): data N(mu, s^2 I) on 1x4x4 images,
the teacher is the exact EDM denoiser D(x, sigma) = mu + c (x - mu), c = s^2 / (s^2 + sigma^2),
and the fake score the exact denoiser of N(m, s^2 I) with a learnable mean m.
- DMD (a run of `warmup` then `dmd` phases, discriminator none): the generator is the shift
  x_g = s z + b from G(80 z, 80) (DMD2's generation sigma). Its distribution equals the data's
  iff b = mu. Here y_fake - y_real = (1 - c)(m - mu), so the DMD gradient pushes b towards mu
  once the fake score has learned m ~ b.
- ADD (a run of `add` phases without a discriminator: the distillation term alone): the student
  sees a real image (from a fixed sample of N(mu, s^2 I), the loop's dataset) noised at one of
  ADD's four levels, x_s = x0 + sigma_s eps, and outputs x_hat = s x_s / sqrt(s^2 + sigma_s^2) +
  b_level (one learnable shift per level, so each level can match on its own).
  E[x_hat - D(x_hat + sigma_t eps')] = (1 - c_t)(E x_hat - mu): the distillation term drives
  E[x_hat | level] to mu, i.e. b_level to mu (1 - s / sqrt(s^2 + sigma_level^2)), for either weighting.
A sign-flipped loss must move the shifts away: the tests can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sida.train.methods.add as add_mod
import sida.train.methods.dmd as dmd_mod
from sida.nets.sampler import add_student_sigmas, karras_grid_sigma
from sida.run import dist
from sida.train.loop import DistillLoop
from sida.train.nets import Nets
from sida.train.methods.dmd import dmd_term
from sida.train.updates import set_lr
from sida.train.baseline_losses import dmd_gradient
from sida.train.losses import sid_generator_loss
from test_sid_gaussian import MU, S, SHAPE, GaussDenoiser, ShiftGenerator

BATCH = 16


def _rc(phases: list[tuple[str, int]], **extra) -> dict:
    """A hand-made run config (the loop fills the schema's defaults): phases in iterations."""
    return {"phases": [{"kind": k, "kimg": n * BATCH / 1000} for k, n in phases], "batch": BATCH,
            "discriminator": False, "ema_halflife_kimg": 0.05, **extra}


def _gens(seed: int) -> dict[str, torch.Generator]:
    return {"noise": torch.Generator().manual_seed(seed), "data": torch.Generator().manual_seed(seed + 1)}


def _iterate(loop: DistillLoop, n: int) -> None:
    for _ in range(n):
        loop.step()
        loop.nimg += loop.batch


def _dmd_loop(iters: int, warmup: int = 40, ratio: int = 1, seed: int = 0) -> DistillLoop:
    """DMD (DMD2 without its GAN term): critic every iteration, generator every `ratio`-th; the
    fake score starts as a copy of the teacher (m = mu) and the warm-up moves it to N(0, s^2)."""
    G = ShiftGenerator()
    nets = Nets(teacher=GaussDenoiser(MU, learnable=False), G=G, G_ema=copy.deepcopy(G),
                fake=GaussDenoiser(MU, learnable=True))
    rc = _rc([("warmup", warmup), ("dmd", iters)], sigma_init=80.0, lr_g=0.01, lr_fake=0.03, critic_ratio=ratio)
    return DistillLoop(rc, nets, None, dist.init("cpu", 0), _gens(seed))


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
    loop = _dmd_loop(iters, ratio=ratio)
    b, m = loop.nets.G.b, loop.nets.fake.mean
    assert loop.gen_sigmas == [80.0]
    _iterate(loop, 40)
    # during the critic-only warm-up the generator does not move, the fake score learns N(0, s^2)
    assert loop.phase_name() == "dmd" and torch.equal(b, torch.zeros_like(b))
    assert m.detach().abs().mean() < 0.25, m.detach().abs().mean()
    _iterate(loop, 10 * ratio)
    # early generator steps move every pixel towards mu (> 0)
    assert (b.detach() > 0).all(), b.detach()
    _iterate(loop, iters - 10 * ratio)
    assert loop.nimg == loop.total_nimg
    b = b.detach()
    err_mean = (b.mean() - MU.mean()).abs().item()
    err_max = (b - MU).abs().max().item()
    # seeds 0-3 (ratio 1) and 0-1 (ratio 5) gave mean errors <= 0.005, per-pixel <= 0.042
    assert err_mean < 0.02 * MU.mean().item(), (err_mean, b)
    assert err_max < 0.1, (err_max, b)
    assert (m.detach() - b).abs().max() < 0.2  # the fake score tracked the generator
    # G_ema followed G (half-life 50 images ~ 3 of its updates)
    assert (loop.nets.G_ema.b.detach().mean() - MU.mean()).abs() < 0.05


def test_dmd_sign_flipped_moves_away(monkeypatch):
    orig = dmd_mod.dmd_generator_loss  # what dmd_term, and so the loop, calls
    monkeypatch.setattr(dmd_mod, "dmd_generator_loss", lambda *a, **k: -orig(*a, **k))
    loop = _dmd_loop(60)
    _iterate(loop, 100)
    b = loop.nets.G.b.detach()
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


class GaussDataset:
    """A fixed sample of N(MU, S^2 I), served as the loop's real images (label_dim 0)."""

    def __init__(self, n: int = 4096, seed: int = 11) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = MU + S * torch.randn(n, *SHAPE, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def get_batch(self, indices, generator=None):
        idx = torch.as_tensor(indices)
        return self.x[idx], torch.zeros([len(idx), 0])


def _add_run(iters: int, weighting: str = "exponential", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ADD's distillation term alone through the loop (an `add` run without a discriminator)."""
    sigmas = add_student_sigmas()
    G = LevelShiftStudent(sigmas)
    nets = Nets(teacher=GaussDenoiser(MU, learnable=False), G=G, G_ema=copy.deepcopy(G),
                fake=GaussDenoiser(MU, learnable=False))
    rc = _rc([("add", iters)], lr_g=0.02, add_weighting=weighting)
    loop = DistillLoop(rc, nets, GaussDataset(), dist.init("cpu", 0), _gens(seed))
    assert loop.gen_sigmas == pytest.approx(sigmas) and loop.critic_params == []  # ADD trains no fake score
    _iterate(loop, iters * 3 // 4)
    set_lr(loop.opt_g, 0.004)  # a smaller last step shrinks Adam's jitter around the fixed point
    _iterate(loop, iters - iters * 3 // 4)
    assert loop.nimg == loop.total_nimg
    return G.b.detach(), torch.tensor(sigmas)


@pytest.mark.parametrize("weighting", ["exponential", "alpha_bar", "sds"])
def test_add_distillation_moves_each_levels_mean_to_data_mean(weighting):
    b, sigmas = _add_run(400, weighting)
    keep = (S / (S ** 2 + sigmas ** 2).sqrt()).reshape(-1, 1, 1, 1)  # how much of x0 survives into x_hat
    mean_out = b + keep * MU  # E[x_hat | level]
    err = mean_out - MU
    # seeds 0-3 gave per-level mean errors within 0.021 and per-pixel errors within 0.104 (exponential, sds);
    # alpha_bar (its smaller weights at high noise): 0.015 and 0.134
    assert err.mean(dim=(1, 2, 3)).abs().max() < 0.04, (err.mean(dim=(1, 2, 3)), weighting)
    assert err.abs().max() < 0.15, (err.abs().max(), weighting)
    assert torch.allclose(b, MU * (1 - keep), atol=0.15)  # b_level = mu (1 - keep_level)
    # level 0 is the generation level (sigma 80): it keeps almost nothing of x0 (keep 0.006),
    # so one-step samples G(80 z, 80) have mean b_0 ~ mu
    assert sigmas[0] == pytest.approx(80.0) and keep[0].item() < 0.01


def test_add_distillation_sign_flipped_moves_away(monkeypatch):
    orig = add_mod.add_distill_loss  # what add_distill_term, and so the loop, calls
    monkeypatch.setattr(add_mod, "add_distill_loss", lambda *a, **k: -orig(*a, **k))
    b, sigmas = _add_run(100)
    keep = (S / (S ** 2 + sigmas ** 2).sqrt()).reshape(-1, 1, 1, 1)
    # E[x_hat | level] - mu starts at (keep - 1) mu (about -0.99, -0.97, -0.80, -0.05 on average)
    # and runs further away at every level
    err0 = ((keep - 1) * MU).mean(dim=(1, 2, 3))
    err = (b + keep * MU - MU).mean(dim=(1, 2, 3))
    assert (err < err0 - 0.08).all() and (err[:3] < -1.2).all(), (err0, err)
