"""SiD in the analytic Gaussian case, through the real `sida.train.loop.DistillLoop`.

Data N(mu, s^2 I) on 1x4x4 "images". The teacher is the exact EDM denoiser of that
distribution, D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu). The generator is a learnable
shift, x_g = s z + b (b starts at 0), called with the one-step convention G(sigma_init z,
sigma_init). The fake score is the exact denoiser of N(m, s^2 I) with a learnable mean m that
the loop's fake-score step trains (it starts as a copy of the teacher, m = mu, as in SiD, and the
warmup phase moves it to the generator's mean). The generator's distribution N(b, s^2 I) equals
the data's exactly when b = mu, so SiD must drive b to mu, for alpha 1.0 and 1.2 alike (here
y_real - y_fake = (1 - c)(mu - m) does not depend on x_t, so alpha only shifts the loss value).
"""

from __future__ import annotations

import copy

import pytest
import torch

import sida.train.losses as losses_mod
from sida.run import dist
from sida.train.loop import DistillLoop
from sida.train.nets import Nets

S = 0.5  # data std
SHAPE = (1, 4, 4)
MU = 1.0 + 0.25 * torch.linspace(-1, 1, 16).reshape(1, *SHAPE)  # per-pixel means, mean 1.0


def _sigma4(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    return sigma.expand(x.shape[0], 1, 1, 1) if sigma.shape[0] == 1 else sigma


class _Toy(torch.nn.Module):
    img_channels, img_resolution, label_dim = SHAPE[0], SHAPE[1], 0


class GaussDenoiser(_Toy):
    """Exact EDM denoiser of N(mean, S^2 I); `mean` a parameter (fake score) or buffer (teacher)."""

    def __init__(self, mean: torch.Tensor, learnable: bool) -> None:
        super().__init__()
        if learnable:
            self.mean = torch.nn.Parameter(mean.clone())
        else:
            self.register_buffer("mean", mean.clone())

    def forward(self, x, sigma, class_labels=None, return_flag="decoder", **_):
        assert return_flag == "decoder"
        c = S ** 2 / (S ** 2 + _sigma4(sigma, x) ** 2)
        return self.mean + c * (x - self.mean)


class ShiftGenerator(_Toy):
    """x_g = S z + b from the one-step input (sigma_init z, sigma_init)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(1, *SHAPE))

    def forward(self, x, sigma, class_labels=None, **_):
        z = x / _sigma4(sigma, x)
        return S * z + self.b


def _rc(alpha: float, warmup_iters: int, sid_iters: int, batch: int = 16) -> dict:
    return {"phases": [{"kind": "warmup", "kimg": warmup_iters * batch / 1000},
                       {"kind": "sid", "kimg": sid_iters * batch / 1000}],
            "discriminator": False, "batch": batch, "batch_per_proc": None,
            "lr_g": 0.01, "lr_fake": 0.03, "adam_eps": 1e-8, "sigma_init": 2.5, "P_mean": -1.2, "P_std": 1.2,
            "precision": "fp32", "tmax": 800, "alpha": alpha, "lambda_sid": 100.0, "lambda_adv": 0.01,
            "lambda_d": 1.0, "ema_halflife_kimg": 0.05, "ema_rampup_ratio": None, "fake_clip": 1.0}


def _make_loop(alpha: float, warmup_iters: int, sid_iters: int, seed: int = 0) -> DistillLoop:
    info = dist.init("cpu", 0)
    teacher = GaussDenoiser(MU, learnable=False)
    G = ShiftGenerator()
    nets = Nets(teacher=teacher, G=G, G_ema=copy.deepcopy(G), fake=GaussDenoiser(MU, learnable=True))
    noise = torch.Generator().manual_seed(seed)
    data = torch.Generator().manual_seed(seed + 1)
    return DistillLoop(_rc(alpha, warmup_iters, sid_iters), nets, None, info, {"noise": noise, "data": data})


def _iterate(loop: DistillLoop, n: int) -> None:
    for _ in range(n):
        loop.step()
        loop.nimg += loop.batch


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_moves_generator_mean_to_data_mean(alpha):
    warmup, sid_iters = 60, 300
    loop = _make_loop(alpha, warmup, sid_iters)
    b, m = loop.nets.G.b, loop.nets.fake.mean

    _iterate(loop, warmup)
    assert loop.phase_name() == "sid"
    assert torch.equal(b, torch.zeros_like(b)), "warmup must not touch the generator"
    # The fake score learned the generator's distribution N(0, S^2): m moved from mu to ~0.
    assert m.detach().abs().mean() < 0.25, m.detach().abs().mean()

    _iterate(loop, 10)
    # After a few SiD steps every pixel of b moved towards mu (a sign flip would move it away).
    assert (b.detach() > 0).all(), b.detach()

    _iterate(loop, sid_iters - 10)
    assert loop.nimg == loop.total_nimg
    err_mean = (b.detach().mean() - MU.mean()).abs().item()
    err_max = (b.detach() - MU).abs().max().item()
    assert err_mean < 0.05 * MU.mean().item(), (err_mean, b.detach())
    assert err_max < 0.15, (err_max, b.detach())
    # G_ema followed G (EMA half-life 50 images ~ 3 iterations)
    assert (loop.nets.G_ema.b.detach().mean() - MU.mean()).abs() < 0.1


def test_sign_flipped_generator_loss_moves_away(monkeypatch):
    """The test above can fail: with the SiD loss negated, b runs away from mu."""
    orig = losses_mod.sid_generator_loss  # what the loop's sid_generator_terms calls
    monkeypatch.setattr(losses_mod, "sid_generator_loss", lambda *a, **k: -orig(*a, **k))
    loop = _make_loop(1.2, 60, 100)
    _iterate(loop, 60 + 40)
    b = loop.nets.G.b.detach()
    assert (b < 0).all() and b.mean() < -0.2, b
