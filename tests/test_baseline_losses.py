"""The DMD2 and ADD loss functions of `sida.train.losses` against numbers worked out by hand (in
the comments and as plain arithmetic in the test), on tensors of a few elements."""

from __future__ import annotations

import math

import pytest
import torch

from sida.train.baseline_losses import (add_discriminator_objective, add_distill_loss, add_distill_weight,
                                        add_generator_objective, dmd2_critic_objective, dmd2_generator_objective,
                                        dmd_generator_loss, dmd_gradient, hinge_discriminator_loss,
                                        hinge_generator_loss, ns_discriminator_loss, ns_generator_loss, r1_penalty)
from sida.train.losses import edm_denoising_loss, sid_generator_loss


def t(values, shape=None, grad=False):
    x = torch.tensor(values, dtype=torch.float32)
    x = x if shape is None else x.reshape(shape)
    return x.requires_grad_(grad)


def close(a: torch.Tensor, expected, tol: float = 1e-6) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float32).reshape(a.shape)
    assert torch.allclose(a.detach().float(), exp, rtol=tol, atol=tol), f"{a.flatten().tolist()} != {exp.flatten().tolist()}"


# -- DMD -----------------------------------------------------------------------------------------
# two samples, two pixels each:
#   sample 0: x_g = [0, 0], y_real = [1, 2], y_fake = [0.5, 1]
#             weight_factor = mean(|0-1|, |0-2|) = 1.5;  g = ([0.5, 1] - [1, 2]) / 1.5 = [-1/3, -2/3]
#   sample 1: x_g = [1, 1], y_real = [0, 3], y_fake = [2, 3]
#             weight_factor = mean(1, 2) = 1.5;          g = ([2, 3] - [0, 3]) / 1.5 = [4/3, 0]
X_G = [0.0, 0.0, 1.0, 1.0]
Y_REAL = [1.0, 2.0, 0.0, 3.0]
Y_FAKE = [0.5, 1.0, 2.0, 3.0]
SHAPE = [2, 1, 1, 2]
G_HAND = [-1 / 3, -2 / 3, 4 / 3, 0.0]


def test_dmd_gradient_by_hand():
    x_g = t(X_G, SHAPE, grad=True)
    g = dmd_gradient(t(Y_REAL, SHAPE), t(Y_FAKE, SHAPE), x_g)
    assert g.shape == x_g.shape
    close(g, G_HAND)
    assert g.grad_fn is None and not g.requires_grad  # a stop-gradient quantity


def test_dmd_gradient_normaliser_is_clipped_at_1e5():
    # x_g == y_real: the mean |x_g - y_real| is 0 and clipped to 1e-5 (DMD2 would give inf -> nan_to_num)
    g = dmd_gradient(t([1.0, 1.0], [1, 1, 1, 2]), t([1.5, 0.5], [1, 1, 1, 2]), t([1.0, 1.0], [1, 1, 1, 2]))
    close(g, [0.5e5, -0.5e5], tol=1e-2)


def test_dmd_loss_value_and_gradient_by_hand():
    x_g = t(X_G, SHAPE, grad=True)
    loss = dmd_generator_loss(t(Y_REAL, SHAPE), t(Y_FAKE, SHAPE), x_g)
    assert loss.shape == x_g.shape
    # value 0.5 g^2: [1/18, 4/18, 16/18, 0]
    close(loss, [1 / 18, 4 / 18, 16 / 18, 0.0])
    loss.sum().backward()
    # gradient of 0.5 (x - sg(x - g))^2 is (x - (x - g)) = g
    close(x_g.grad, G_HAND)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_dmd_gradient_equals_detached_sid_gradient(alpha):
    """With y_real and y_fake detached, d/dx_g sum(L_sid) = -(y_real - y_fake) / wf = g, factor 1,
    for every alpha (alpha multiplies (y_real - y_fake)^2, which has no explicit x_g)."""
    gen = torch.Generator().manual_seed(3)
    y_real, y_fake = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    x_sid = torch.randn(4, 3, 5, 5, generator=gen).requires_grad_(True)
    x_dmd = x_sid.detach().clone().requires_grad_(True)
    sid_generator_loss(y_real, y_fake, x_sid, alpha).sum().backward()
    dmd_generator_loss(y_real, y_fake, x_dmd).sum().backward()
    assert torch.allclose(x_sid.grad, x_dmd.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x_dmd.grad, dmd_gradient(y_real, y_fake, x_dmd), rtol=1e-6, atol=1e-7)
    # the loss values are not the same quantity (only the gradients agree)
    assert not torch.allclose(sid_generator_loss(y_real, y_fake, x_sid, alpha).sum(),
                              dmd_generator_loss(y_real, y_fake, x_dmd).sum())


def test_sid_at_alpha_half_is_half_difference_of_denoising_errors():
    # (y_r - y_f)((y_r - x) - (y_r - y_f)/2) = ((y_r - x)^2 - (y_f - x)^2) / 2; on the hand case:
    # sample 0: ((1 + 4) - (0.25 + 1)) / 2 / 1.5 = 1.25;  sample 1: ((1 + 4) - (1 + 4)) / 2 / 1.5 = 0
    l = sid_generator_loss(t(Y_REAL, SHAPE), t(Y_FAKE, SHAPE), t(X_G, SHAPE), 0.5)
    assert l[0].sum().item() == pytest.approx(1.25)
    assert l[1].sum().item() == pytest.approx(0.0, abs=1e-7)


def test_dmd2_objectives_scale_like_dmd2():
    # generator: mean over pixels and batch of 0.5 g^2 = (1/18 + 4/18 + 16/18 + 0) / 4 = 21/72;
    # plus 3e-3 * mean([ln 2, 2]) over the batch of two
    x_g = t(X_G, SHAPE, grad=True)
    l_dm = dmd_generator_loss(t(Y_REAL, SHAPE), t(Y_FAKE, SHAPE), x_g)
    l_gan = t([math.log(2), 2.0])
    out = dmd2_generator_objective(l_dm, l_gan, batch_total=2, lambda_gan=3e-3)
    assert out.item() == pytest.approx(21 / 72 + 3e-3 * (math.log(2) + 2) / 2, rel=1e-6)
    assert dmd2_generator_objective(l_dm, None, batch_total=2).item() == pytest.approx(21 / 72, rel=1e-6)
    # its gradient on x_g is g / (B C H W): DMD2's F.mse_loss(reduction="mean") convention
    out.backward()
    close(x_g.grad, [v / 4 for v in G_HAND])
    # critic: EDM loss at sigma 1 (weight 5) on pixels [1, 0] vs clean [0, 0] -> [5, 0], mean 2.5;
    # plus 1e-2 * (1.0 + 3.0) / 2
    l_fake = edm_denoising_loss(t([1.0, 0.0], [1, 1, 1, 2]), t([0.0, 0.0], [1, 1, 1, 2]), t([1.0], [1, 1, 1, 1]))
    crit = dmd2_critic_objective(l_fake, t([1.0, 3.0]), batch_total=1, lambda_cls=1e-2)
    assert crit.item() == pytest.approx(2.5 + 1e-2 * 4.0, rel=1e-6)


# -- GAN losses ------------------------------------------------------------------------------------

def test_non_saturating_losses_at_known_logits():
    ln3 = math.log(3)
    # generator: softplus(-0) = ln 2, softplus(-ln 3) = ln(1 + 1/3) = ln(4/3)
    close(ns_generator_loss(t([[0.0], [ln3]])), [math.log(2), math.log(4 / 3)])
    # a logit map is averaged per sample: [0, ln 3] -> (ln 2 + ln 4/3) / 2
    close(ns_generator_loss(t([[0.0, ln3]])), [(math.log(2) + math.log(4 / 3)) / 2])
    # discriminator: softplus(D(fake)) + softplus(-D(real))
    #   pair 0: real ln 3, fake 0     -> ln(4/3) + ln 2 = ln(8/3)
    #   pair 1: real 0,    fake -ln 3 -> ln 2 + ln(4/3)
    #   pair 2: real -2,   fake 2     -> 2 * ln(1 + e^2)
    d = ns_discriminator_loss(t([[ln3], [0.0], [-2.0]]), t([[0.0], [-ln3], [2.0]]))
    close(d, [math.log(8 / 3), math.log(8 / 3), 2 * math.log(1 + math.e ** 2)], tol=1e-5)
    # gradient w.r.t. the fake logit is sigmoid(D(fake)): sigmoid(0) = 1/2
    lf = t([[0.0]], grad=True)
    ns_discriminator_loss(t([[0.0]]), lf).sum().backward()
    close(lf.grad, [0.5])


def test_hinge_losses_at_known_logits():
    real = t([[2.0], [0.5], [-1.0]])
    fake = t([[-2.0], [0.0], [0.5]])
    # max(0, 1 - real) = [0, 0.5, 2]; max(0, 1 + fake) = [0, 1, 1.5]
    close(hinge_discriminator_loss(real, fake), [0.0, 1.5, 3.5])
    close(hinge_generator_loss(fake), [2.0, 0.0, -0.5])
    # per-token logits are averaged per sample: real tokens [2, 0] -> (0 + 1) / 2, fake [-1, 1] -> (0 + 2) / 2
    close(hinge_discriminator_loss(t([[2.0, 0.0]]), t([[-1.0, 1.0]])), [1.5])
    # the hinge saturates: no gradient from a real logit above 1
    lr = t([[2.0], [0.0]], grad=True)
    hinge_discriminator_loss(lr, t([[0.0], [0.0]])).sum().backward()
    close(lr.grad, [0.0, -1.0])


def test_r1_on_a_linear_head_is_tokens_times_w_squared():
    w = t([1.0, 2.0, -2.0], grad=True)  # ||w||^2 = 9
    feats = torch.randn(4, 3, 5).requires_grad_(True)  # [B, C, N = 5 tokens]
    logits = torch.einsum("c,bcn->bn", w, feats)
    r1 = r1_penalty(logits, [feats])
    close(r1, [45.0] * 4)  # N ||w||^2 = 5 * 9
    # the penalty keeps its graph: d(sum r1)/dw = 4 samples * 2 N w = 40 w
    r1.sum().backward()
    close(w.grad, [40.0, 80.0, -80.0], tol=1e-5)


def test_r1_is_per_sample_and_sums_over_inputs():
    # logits = 0.5 sum f^2 (per sample) on two inputs -> grad = f, R1 = ||f_a||^2 + ||f_b||^2
    fa = t([[1.0, 2.0], [0.0, 3.0]], grad=True)
    fb = t([[[1.0]], [[-2.0]]], grad=True)
    logits = 0.5 * (fa ** 2).sum(dim=1) + 0.5 * (fb ** 2).flatten(1).sum(dim=1)
    close(r1_penalty(logits, [fa, fb]), [1 + 4 + 1, 0 + 9 + 4])


# -- ADD -------------------------------------------------------------------------------------------

def test_add_weightings_by_hand():
    s = t([0.0, 1.0, math.sqrt(3), 80.0])
    close(add_distill_weight(s, "exponential"), [1.0, 1 / math.sqrt(2), 0.5, 1 / math.sqrt(6401)])
    close(add_distill_weight(s, "sds"), [0.0, 0.25, math.sqrt(3) / 8, 80 / (2 * 6401)])
    with pytest.raises(ValueError):
        add_distill_weight(s, "snr")


def test_sds_weighting_reproduces_the_sds_gradient():
    """With c = sds weight, d/dx of c (x - sg(D))^2 equals SDS's w(t) (eps_hat - eps), w = sigma_VP^2.

    EDM sigma 1 -> alpha = sigma_VP = 1/sqrt 2. x = 0.3, D = 0.1, eps = 0.7:
    z_VP = alpha (x + sigma eps) = 1/sqrt 2; eps_hat = (z_VP - alpha D) / sigma_VP = 1 - 0.1 = 0.9;
    SDS gradient = 0.5 * (0.9 - 0.7) = 0.1. Ours: c = 1 / (2 * 2) = 0.25; 2 c (x - D) = 0.1.
    """
    sigma = torch.tensor(1.0)
    x = t([0.3], grad=True)
    D = t([0.1])
    add_distill_loss(x, D, add_distill_weight(sigma, "sds")).sum().backward()
    alpha = sigma_vp = 1 / math.sqrt(2)
    z_vp = alpha * (0.3 + 1.0 * 0.7)
    eps_hat = (z_vp - alpha * 0.1) / sigma_vp
    assert x.grad.item() == pytest.approx(sigma_vp ** 2 * (eps_hat - 0.7), rel=1e-6)
    assert x.grad.item() == pytest.approx(0.1, rel=1e-6)


def test_add_distill_loss_by_hand():
    x_hat = t([1.0, 2.0, 0.0, 0.0], [2, 1, 1, 2], grad=True)
    D = t([0.5, 3.0, 1.0, -1.0], [2, 1, 1, 2], grad=True)
    c = t([0.5, 2.0], [2, 1, 1, 1])
    loss = add_distill_loss(x_hat, D, c)
    # sample 0: 0.5 [0.25, 1] = [0.125, 0.5]; sample 1: 2 [1, 1] = [2, 2]
    close(loss, [0.125, 0.5, 2.0, 2.0])
    loss.sum().backward()
    close(x_hat.grad, [0.5, -1.0, -4.0, 4.0])  # 2 c (x - D): 2*0.5*[0.5, -1], 2*2*[-1, 1]
    assert D.grad is None  # the teacher's target is a stop-gradient


def test_add_objectives_by_hand():
    # generator: mean hinge-G [-1, 3] -> 1; distill per-pixel [0.125, 0.5, 2, 2] -> mean 1.15625; lambda 2.5
    l_distill = t([0.125, 0.5, 2.0, 2.0], [2, 1, 1, 2])
    out = add_generator_objective(t([-1.0, 3.0]), l_distill, batch_total=2, lambda_distill=2.5)
    assert out.item() == pytest.approx(1.0 + 2.5 * 4.625 / 4, rel=1e-6)
    assert add_generator_objective(None, l_distill, 2).item() == pytest.approx(2.5 * 4.625 / 4, rel=1e-6)
    # discriminator: mean hinge-D [1.5, 0.5] -> 1; gamma 1e-5 * mean R1 [45, 5] -> 2.5e-4
    d = add_discriminator_objective(t([1.5, 0.5]), t([45.0, 5.0]), batch_total=2, gamma=1e-5)
    assert d.item() == pytest.approx(1.0 + 1e-5 * 25.0, rel=1e-6)
    assert add_discriminator_objective(t([1.5, 0.5]), None, 2).item() == pytest.approx(1.0)
