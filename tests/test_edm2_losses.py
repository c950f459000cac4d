"""The latent-space (EDM2) loss terms by hand: the fake score's uncertainty-weighted loss and the
division of the discriminator, SiD and adversarial losses by e^logvar."""

from __future__ import annotations

import math

import torch

from sida.train.losses import (adversarial_generator_loss, discriminator_loss, edm2_denoising_loss,
                               edm_loss_weight, uncertainty_weighted)


def test_edm2_denoising_loss_by_hand():
    denoised = torch.tensor([[[[1.0, 2.0]]]])  # [1,1,1,2]
    clean = torch.tensor([[[[0.0, 0.5]]]])
    sigma = torch.tensor([[[[1.0]]]])
    logvar = torch.tensor([[[[0.7]]]])
    w = (1 + 0.25) / (1 * 0.5) ** 2  # lambda(1) = 5
    want = torch.tensor([[[[w / math.exp(0.7) * 1.0 + 0.7, w / math.exp(0.7) * 2.25 + 0.7]]]])
    torch.testing.assert_close(edm2_denoising_loss(denoised, clean, sigma, logvar), want)
    # logvar = 0 is EDM's loss; summing over pixels adds C*H*W*logvar per sample.
    torch.testing.assert_close(edm2_denoising_loss(denoised, clean, sigma, torch.zeros_like(logvar)),
                               edm_loss_weight(sigma) * (denoised - clean) ** 2)
    x = torch.randn(3, 4, 2, 2)
    lv = torch.tensor([0.1, -0.2, 0.3]).reshape(3, 1, 1, 1)
    per_sample = edm2_denoising_loss(x, torch.zeros_like(x), torch.ones(3, 1, 1, 1), lv).sum((1, 2, 3))
    torch.testing.assert_close(per_sample, 5 * (x ** 2).sum((1, 2, 3)) / lv.flatten().exp() + 16 * lv.flatten())


def test_optimal_logvar_is_the_log_of_the_weighted_error():
    # d/du [(e / e^u) + u] = 0 at u = ln e: the head learns the expected weighted error.
    e = torch.tensor(3.0)
    u = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([u], lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        (uncertainty_weighted(e, u) + u).backward()
        opt.step()
    assert abs(u.item() - math.log(3.0)) < 1e-3


def test_discriminator_and_generator_losses_divided_by_e_logvar():
    g = torch.Generator().manual_seed(0)
    lr, lf = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)
    lv = torch.tensor([0.4, -1.0]).reshape(2, 1, 1, 1)
    w = edm_loss_weight(sigma)
    plain = discriminator_loss(lr, lf, w)
    weighted = discriminator_loss(lr, lf, uncertainty_weighted(w, lv))
    torch.testing.assert_close(weighted, plain / lv.exp())
    bce_r = torch.nn.functional.softplus(-lr).mean()  # BCE(logits, 1)
    bce_f = torch.nn.functional.softplus(lf).mean()  # BCE(logits, 0)
    torch.testing.assert_close(weighted.flatten(), (w / lv.exp() * (bce_r + bce_f) / 2).flatten())
    wf = torch.tensor([0.2, 0.8]).reshape(2, 1, 1, 1)
    adv = uncertainty_weighted(adversarial_generator_loss(lf, wf, (4, 8, 8)), lv)
    torch.testing.assert_close(adv, torch.nn.functional.softplus(-lf.clamp(-10, 10)).mean() / wf * 256 / lv.exp())
    l_sid = torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(uncertainty_weighted(l_sid, lv), l_sid * torch.exp(-lv))
