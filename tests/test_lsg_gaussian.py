"""SiD with long-and-short guidance (SiD-LSG) in an analytic text-conditioned Gaussian case,
through the real `DistillLoop`.

Prompts are a scalar condition c per sample (1: "the prompt", 0: the empty prompt, the network's
`uncond`). Data given c is N(mu(c), S^2 I) with mu(c) = MU_U + c (MU_C - MU_U), and the teacher is
its exact EDM denoiser. Guiding it at scale k gives D_u + k (D_c - D_u), which is exactly the
denoiser of N(MU_U + k (MU_C - MU_U), S^2 I): SiD with the teacher guided at kappa4 = k must
drive a shift generator x_g = S z + b to that guided mean, not to MU_C. The fake score is the
exact denoiser of N(m(c), S^2 I) with learnable m_u, m_c, so the guided fake-score training of
kappa1 and the prompt dropout have something to act on.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sida.errors import ConfigError
from sida.nets.guidance import guided
from sida.run import dist
from sida.train.loop import DistillLoop
from sida.train.nets import Nets

S = 0.5
SHAPE = (1, 4, 4)
MU_U = torch.full((1, *SHAPE), 0.2)
MU_C = 0.8 + 0.2 * torch.linspace(-1, 1, 16).reshape(1, *SHAPE)


def _sigma4(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return sigma.expand(x.shape[0], 1, 1, 1) if sigma.shape[0] == 1 else sigma


class _TextToy(torch.nn.Module):
    img_channels, img_resolution, label_dim = SHAPE[0], SHAPE[1], 0

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("uncond", torch.zeros(1, 1, 1))  # the empty prompt's "embedding"

    def condition(self, cond: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        return self.uncond.expand(n, 1, 1) if cond is None else cond


class TextGaussDenoiser(_TextToy):
    """Exact denoiser of N(m_u + c (m_c - m_u), S^2 I); the means learnable (fake) or fixed (teacher)."""

    def __init__(self, m_u: torch.Tensor, m_c: torch.Tensor, learnable: bool) -> None:
        super().__init__()
        for name, value in (("m_u", m_u), ("m_c", m_c)):
            if learnable:
                setattr(self, name, torch.nn.Parameter(value.clone()))
            else:
                self.register_buffer(name, value.clone())

    def forward(self, x, sigma, cond=None, return_flag="decoder", **_):
        assert return_flag == "decoder"
        c = cond.reshape(-1, 1, 1, 1)
        mean = self.m_u + c * (self.m_c - self.m_u)
        w = S ** 2 / (S ** 2 + _sigma4(sigma, x) ** 2)
        return mean + w * (x - mean)


class ShiftGenerator(_TextToy):
    """x_g = S z + b for every prompt, from the one-step input (sigma_init z, sigma_init)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(1, *SHAPE))

    def forward(self, x, sigma, cond=None, **_):
        return S * x / _sigma4(sigma, x) + self.b


class Prompts:
    """A prompt set of one prompt (condition 1) with its embedding as `labels`."""

    def __len__(self) -> int:
        return 4

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(idx), 1, 1)


def _rc(warmup: int, sid: int, batch: int = 16, **kw) -> dict:
    return {"phases": [{"kind": "warmup", "kimg": warmup * batch / 1000}, {"kind": "sid", "kimg": sid * batch / 1000}],
            "discriminator": False, "batch": batch, "lr_g": 0.01, "lr_fake": 0.03, "alpha": 1.0,
            "ema_halflife_kimg": 0.05, **kw}


def _loop(warmup: int, sid: int, seed: int = 0, **kw) -> DistillLoop:
    teacher = TextGaussDenoiser(MU_U, MU_C, learnable=False)
    G = ShiftGenerator()
    nets = Nets(teacher=teacher, G=G, G_ema=copy.deepcopy(G), fake=TextGaussDenoiser(MU_U, MU_C, learnable=True))
    gens = {"noise": torch.Generator().manual_seed(seed), "data": torch.Generator().manual_seed(seed + 1)}
    return DistillLoop(_rc(warmup, sid, **kw), nets, Prompts(), dist.init("cpu", 0), gens)


def _iterate(loop: DistillLoop, n: int) -> None:
    for _ in range(n):
        loop.step()
        loop.nimg += loop.batch


def test_guided_equals_the_denoiser_of_the_guided_gaussian():
    net = TextGaussDenoiser(MU_U, MU_C, learnable=False)
    x, sigma, cond = torch.randn(3, *SHAPE), torch.tensor([0.3, 1.0, 4.0]), torch.ones(3, 1, 1)
    for k in (1.0, 1.5, 4.5):
        target = TextGaussDenoiser(MU_U, MU_U + k * (MU_C - MU_U), learnable=False)(x, sigma, cond)
        torch.testing.assert_close(guided(net, x, sigma, cond, k), target)


@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_teacher_guidance_moves_the_generator_to_the_guided_mean(kappa):
    loop = _loop(60, 300, guidance_teacher=kappa)
    _iterate(loop, 360)
    target = MU_U + kappa * (MU_C - MU_U)
    b = loop.nets.G.b.detach()
    assert (b - target).abs().max() < 0.12, (b - target).abs().max()
    other = MU_U + (3 - kappa) * (MU_C - MU_U)  # the other scale's mean: b must be far from it
    assert (b - other).abs().mean() > 0.3


def test_lsg_equal_scales_move_the_generator_to_the_guided_mean():
    """kappa1 = kappa2 = kappa4 (SiD-LSG's released runs): the fake score is guided when it trains
    and inside the generator loss; the generator still goes to the guided mean."""
    k = 1.5
    loop = _loop(60, 300, guidance_teacher=k, guidance_fake=k, guidance_fake_train=k)
    _iterate(loop, 360)
    b = loop.nets.G.b.detach()
    assert (b - (MU_U + k * (MU_C - MU_U))).abs().max() < 0.15


def _dropped_rows(monkeypatch, **kw) -> list[torch.Tensor]:
    """The fake score's training conditions after prompt dropout, per critic call."""
    from sida.train.draws import Draws

    seen, orig = [], Draws.drop_prompts
    monkeypatch.setattr(Draws, "drop_prompts", lambda self, *a: seen.append(orig(self, *a)) or seen[-1])
    _iterate(_loop(40, 1, **kw), 40)
    return seen


def test_empty_prompts_replace_a_tenth_of_the_guided_fake_scores_prompts(monkeypatch):
    seen = _dropped_rows(monkeypatch, guidance_fake=1.5)
    empty = torch.cat(seen).flatten() == 0
    assert len(seen) == 40 and 0.05 < empty.float().mean() < 0.16, empty.float().mean()
    assert _dropped_rows(monkeypatch, guidance_teacher=2.0) == []  # only the teacher guided: no dropout


def test_guidance_on_a_class_conditional_teacher_is_refused_in_one_line():
    from test_sid_gaussian import GaussDenoiser, ShiftGenerator as ClassShift

    G = ClassShift()
    nets = Nets(teacher=GaussDenoiser(MU_C, False), G=G, G_ema=copy.deepcopy(G), fake=GaussDenoiser(MU_C, True))
    with pytest.raises(ConfigError, match="guidance_teacher 2.0: classifier-free guidance needs a text-to-image"):
        DistillLoop(_rc(1, 1, guidance_teacher=2.0), nets, None, dist.init("cpu", 0))
    with pytest.raises(ConfigError, match="timestep_range needs a diffusers teacher"):
        DistillLoop(_rc(1, 1, timestep_range=[20, 980]), nets, None, dist.init("cpu", 0))


def test_dmd2_guided_real_score_moves_the_generator_to_the_guided_mean():
    """DMD2 on a text teacher (its real score guided, DMD2's real_guidance_scale): distribution
    matching goes to the guided Gaussian, MU_U + k (MU_C - MU_U), not the conditional one."""
    k, batch = 1.75, 16
    teacher = TextGaussDenoiser(MU_U, MU_C, learnable=False)
    G = ShiftGenerator()
    nets = Nets(teacher=teacher, G=G, G_ema=copy.deepcopy(G), fake=TextGaussDenoiser(MU_U, MU_C, learnable=True))
    rc = _rc(40, 300, guidance_teacher=k, sigma_init=80.0)
    rc["phases"] = [{"kind": "warmup", "kimg": 40 * batch / 1000}, {"kind": "dmd", "kimg": 300 * batch / 1000}]
    rc["lr_fake"] = 0.03
    gens = {"noise": torch.Generator().manual_seed(0), "data": torch.Generator().manual_seed(1)}
    loop = DistillLoop(rc, nets, Prompts(), dist.init("cpu", 0), gens)
    _iterate(loop, 340)
    b = loop.nets.G.b.detach()
    assert (b - (MU_U + k * (MU_C - MU_U))).abs().max() < 0.12, b
