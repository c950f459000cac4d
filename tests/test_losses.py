"""The loss functions of `sida.train.losses` against numbers worked out by hand (plain arithmetic in the
test, never the same formula through torch), on tensors of a few elements."""

from __future__ import annotations

import math

import pytest
import torch

from sida.train.losses import (adversarial_generator_loss, discriminator_loss, edm_denoising_loss, edm_loss_weight,
                         sid_critic_objective, sid_generator_objective, sid_generator_loss, sid_weight_factor)


def t(values, shape=None):
    x = torch.tensor(values, dtype=torch.float32)
    return x if shape is None else x.reshape(shape)


def close(a: torch.Tensor, expected, tol: float = 1e-5) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float32).reshape(a.shape) if not isinstance(expected, float) \
        else torch.full_like(a, expected)
    assert torch.allclose(a.float(), exp, rtol=tol, atol=tol), f"{a.flatten().tolist()} != {exp.flatten().tolist()}"


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


# -- EDM -----------------------------------------------------------------------------------------

def test_edm_loss_weight_by_hand():
    # (sigma^2 + 0.25) / (0.25 sigma^2): sigma 1 -> 1.25/0.25 = 5; sigma 2 -> 4.25/1 = 4.25;
    # sigma 0.5 -> 0.5/0.0625 = 8.
    close(edm_loss_weight(t([1.0, 2.0, 0.5])), [5.0, 4.25, 8.0])
    # another sigma_data: sd = 1, sigma = 2 -> (4 + 1) / 4 = 1.25
    close(edm_loss_weight(t([2.0]), sigma_data=1.0), [1.25])


def test_edm_denoising_loss_by_hand():
    denoised = t([1.0, 2.0, 3.0, 4.0, 0.0, 0.5, 1.0, 1.0], [2, 1, 2, 2])
    clean = t([0.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 3.0], [2, 1, 2, 2])
    sigma = t([1.0, 2.0], [2, 1, 1, 1])  # weights 5 and 4.25
    out = edm_denoising_loss(denoised, clean, sigma)
    assert out.shape == clean.shape
    close(out, [5 * 1, 5 * 0, 5 * 4, 5 * 9, 4.25 * 1, 4.25 * 0.25, 4.25 * 1, 4.25 * 4])


# -- SiD -----------------------------------------------------------------------------------------

def test_sid_weight_factor_by_hand_clip_and_no_grad():
    x_g = t([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5], [2, 1, 2, 2]).requires_grad_(True)
    y_real = t([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5], [2, 1, 2, 2])
    wf = sid_weight_factor(x_g, y_real)
    assert wf.shape == (2, 1, 1, 1)
    # sample 0: mean(1, 2, 3, 4) = 2.5; sample 1: x_g == y_real -> 0, clipped to 1e-5
    assert wf[0].item() == pytest.approx(2.5)
    assert wf[1].item() == pytest.approx(1e-5, rel=1e-6)
    assert not wf.requires_grad and wf.grad_fn is None
    # the clip is at 1e-5, not at some other small number: a mean of 2e-5 passes through
    wf2 = sid_weight_factor(t([2e-5, -2e-5], [1, 1, 1, 2]), t([0.0, 0.0], [1, 1, 1, 2]))
    assert wf2.item() == pytest.approx(2e-5, rel=1e-4)


# one sample, two pixels:
#   y_real = [1, 2], y_fake = [0.5, 1], x_g = [0, 0]
#   weight_factor = mean(|0 - 1|, |0 - 2|) = 1.5
#   diff = y_real - y_fake = [0.5, 1];  y_real - x_g = [1, 2]
#   alpha 1.0: [0.5 (1 - 0.5), 1 (2 - 1)] / 1.5     = [0.25, 1.0] / 1.5
#   alpha 1.2: [0.5 (1 - 0.6), 1 (2 - 1.2)] / 1.5   = [0.2, 0.8] / 1.5
@pytest.mark.parametrize("alpha,expected", [(1.0, [0.25 / 1.5, 1.0 / 1.5]), (1.2, [0.2 / 1.5, 0.8 / 1.5])])
def test_sid_generator_loss_by_hand(alpha, expected):
    y_real, y_fake = t([1.0, 2.0], [1, 1, 1, 2]), t([0.5, 1.0], [1, 1, 1, 2])
    x_g = t([0.0, 0.0], [1, 1, 1, 2]).requires_grad_(True)
    loss = sid_generator_loss(y_real, y_fake, x_g, alpha)
    assert loss.shape == x_g.shape
    close(loss, expected)
    # Gradient through the explicit x_g term only (weight_factor has none): d/dx_g of
    # diff * (y_real - x_g) / wf = -diff / wf = [-0.5, -1] / 1.5, whatever alpha is.
    loss.sum().backward()
    close(x_g.grad, [-0.5 / 1.5, -1.0 / 1.5])


def test_sid_generator_loss_is_negative_in_a_typical_case():
    # Typical: the fake score denoises close to the generator's own sample (y_fake ~ x_g), the
    # teacher somewhere else: L = diff^2 (1 - alpha) + small, negative for alpha = 1.2.
    g = torch.Generator().manual_seed(0)
    x_g = torch.randn([8, 1, 4, 4], generator=g)
    y_fake = x_g + 0.05 * torch.randn(x_g.shape, generator=g)
    y_real = x_g + torch.randn(x_g.shape, generator=g)
    assert sid_generator_loss(y_real, y_fake, x_g, 1.2).sum() < 0
    # Per pixel by hand for one value: y_real - x_g = 1, y_fake = x_g -> diff = 1,
    # L = 1 * (1 - 1.2 * 1) / wf(=1) = -0.2
    one = sid_generator_loss(t([1.0], [1, 1, 1, 1]), t([0.0], [1, 1, 1, 1]), t([0.0], [1, 1, 1, 1]), 1.2)
    close(one, [-0.2])


def test_sid_generator_loss_weight_factor_is_per_sample():
    # sample 0 as above (wf 1.5); sample 1 scaled by 2 -> wf 3, loss terms x4 / 2 = x2
    y_real = t([1.0, 2.0, 2.0, 4.0], [2, 1, 1, 2])
    y_fake = t([0.5, 1.0, 1.0, 2.0], [2, 1, 1, 2])
    x_g = torch.zeros([2, 1, 1, 2])
    close(sid_generator_loss(y_real, y_fake, x_g, 1.0), [0.25 / 1.5, 1.0 / 1.5, 0.5 / 1.5, 2.0 / 1.5])


# -- SiDA ----------------------------------------------------------------------------------------

def test_discriminator_loss_by_hand():
    # logits maps [B=2, 1, 1, 2]. BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l).
    real = t([0.0, 1.0, 2.0, -1.0], [2, 1, 1, 2])
    fake = t([0.0, 0.0, -3.0, 1.0], [2, 1, 1, 2])
    bce_r = (softplus(-0.0) + softplus(-1.0) + softplus(-2.0) + softplus(1.0)) / 4
    bce_f = (softplus(0.0) + softplus(0.0) + softplus(-3.0) + softplus(1.0)) / 4
    out = discriminator_loss(real, fake)
    assert out.numel() == 1
    assert out.item() == pytest.approx((bce_r + bce_f) / 2, rel=1e-5)
    # per-sample EDM weight
    w = t([5.0, 4.25], [2, 1, 1, 1])
    out_w = discriminator_loss(real, fake, w)
    close(out_w, [5.0 * (bce_r + bce_f) / 2, 4.25 * (bce_r + bce_f) / 2])


def test_discriminator_loss_is_batch_fakeness():
    # Averaged over the batch AND the map: changing sample 0's fake logits changes every
    # sample's loss value (a per-image BCE would leave sample 1's untouched).
    real = torch.zeros([2, 1, 1, 2])
    fake = torch.zeros([2, 1, 1, 2])
    w = t([1.0, 1.0], [2, 1, 1, 1])
    before = discriminator_loss(real, fake, w)
    close(before, [math.log(2), math.log(2)])
    fake2 = fake.clone()
    fake2[0] = 2.0
    after = discriminator_loss(real, fake2, w)
    bce_f = (2 * softplus(2.0) + 2 * softplus(0.0)) / 4
    expected = (math.log(2) + bce_f) / 2
    close(after, [expected, expected])
    assert after[1].item() != pytest.approx(before[1].item())


def test_adversarial_generator_loss_by_hand_and_clamp():
    wf = t([2.0, 4.0], [2, 1, 1, 1])
    shape = (2, 3, 8, 8)  # C*H*W = 192 (a full [B,C,H,W] shape: the last three count)
    bce_m10 = softplus(10.0)  # BCE(-10, 1) = log(1 + e^10) = 10.0000454
    lo50 = adversarial_generator_loss(torch.full([2, 1, 2, 2], -50.0), wf, shape)
    lo10 = adversarial_generator_loss(torch.full([2, 1, 2, 2], -10.0), wf, shape)
    assert lo50.shape == (2, 1, 1, 1)
    assert torch.equal(lo50, lo10)  # clamped at -10
    close(lo10, [bce_m10 * 192 / 2, bce_m10 * 192 / 4])
    # the upper clamp: +50 and +10 give log(1 + e^-10) too
    hi50 = adversarial_generator_loss(torch.full([2, 1, 2, 2], 50.0), wf, (3, 8, 8))
    close(hi50, [softplus(-10.0) * 192 / 2, softplus(-10.0) * 192 / 4], tol=1e-7)
    # averaged over the batch and the map: sample 0 at 0, sample 1 at -10
    logits = torch.cat([torch.zeros([1, 1, 2, 2]), torch.full([1, 1, 2, 2], -10.0)])
    mean_bce = (math.log(2) + bce_m10) / 2
    close(adversarial_generator_loss(logits, wf, (1, 4, 4)), [mean_bce * 16 / 2, mean_bce * 16 / 4])


def test_generator_objective_by_hand():
    l_sid = t([1.0, 2.0, 3.0, 4.0], [2, 1, 1, 2])  # sum 10
    l_adv = t([100.0, 300.0], [2, 1, 1, 1])  # sum 400
    # SiD phase: 100 * 10 / 4 = 250 (batch_total 4: e.g. 2 per process x 2 rounds)
    out = sid_generator_objective(l_sid, l_adv, lambda_sid=100.0, lambda_adv=0.01, batch_total=4, adversarial=False)
    assert out.item() == pytest.approx(250.0)
    out = sid_generator_objective(l_sid, None, lambda_sid=100.0, lambda_adv=0.01, batch_total=4, adversarial=False)
    assert out.item() == pytest.approx(250.0)
    # SiDA phase: 0.5 * 100 * 10 / 4 + 0.5 * 0.01 * 400 / 4 = 125 + 0.5 = 125.5
    out = sid_generator_objective(l_sid, l_adv, lambda_sid=100.0, lambda_adv=0.01, batch_total=4, adversarial=True)
    assert out.item() == pytest.approx(125.5)


def test_fake_score_objective_by_hand():
    l_fake = t([1.0, 2.0, 3.0, 6.0], [2, 1, 1, 2])  # sum 12
    l_d = t([4.0, 8.0], [2, 1, 1, 1])  # sum 12
    assert sid_critic_objective(l_fake, None, batch_total=3).item() == pytest.approx(4.0)
    assert sid_critic_objective(l_fake, l_d, batch_total=3).item() == pytest.approx(8.0)
    assert sid_critic_objective(l_fake, l_d, batch_total=3, lambda_d=0.5).item() == pytest.approx(6.0)


# -- samples holding a NaN are dropped from their loss -------------------------------------------
# The official losses drop such a sample (boolean indexing) and keep dividing by the full batch;
# the kept samples' terms and gradients must be exactly those of the loss without the sample.

def _leaves(seed: int, **shapes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).requires_grad_(True) for k, s in shapes.items()}


def _grads(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for v in leaves.values():
        v.grad = None
    loss.backward()
    return {k: v.grad.clone() for k, v in leaves.items()}


@pytest.mark.parametrize("where", ["y_real", "y_fake", "x_g", "logits"])
def test_planted_nan_sample_leaves_the_others_generator_gradient_unchanged(where):
    from sida.train.losses import sid_generator_terms

    B, total = 4, 4
    leaves = _leaves(0, x_g=[B, 1, 2, 2], y_real=[B, 1, 2, 2], y_fake=[B, 1, 2, 2], logits=[B, 1, 1, 1])
    with torch.no_grad():
        leaves[where][0].view(-1)[-1] = float("nan")   # one NaN in sample 0
    l_sid, l_adv, keep = sid_generator_terms(leaves["y_real"], leaves["y_fake"], leaves["x_g"], 1.2, leaves["logits"])
    assert keep.tolist() == [False, True, True, True]
    loss = sid_generator_objective(l_sid, l_adv, 100.0, 0.01, total, adversarial=True)
    assert torch.isfinite(loss)
    got = _grads(loss, leaves)

    # reference: the same terms of samples 1..3 alone, still divided by the full batch
    ref_leaves = _leaves(0, x_g=[B, 1, 2, 2], y_real=[B, 1, 2, 2], y_fake=[B, 1, 2, 2], logits=[B, 1, 1, 1])
    k = slice(1, None)
    x_g, y_real, y_fake, logits = (ref_leaves[n][k] for n in ("x_g", "y_real", "y_fake", "logits"))
    ref_sid = sid_generator_loss(y_real, y_fake, x_g, 1.2)
    ref_adv = adversarial_generator_loss(logits, sid_weight_factor(x_g, y_real), x_g.shape)
    ref_loss = sid_generator_objective(ref_sid, ref_adv, 100.0, 0.01, total, adversarial=True)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref = _grads(ref_loss, ref_leaves)
    for n in got:
        torch.testing.assert_close(got[n][1:], ref[n][1:], rtol=1e-6, atol=1e-7, msg=n)
        assert torch.equal(got[n][0], torch.zeros_like(got[n][0])), n  # nothing flows into the dropped one
    # the test can fail: without dropping, the NaN reaches the loss
    plain = sid_generator_objective(sid_generator_loss(leaves["y_real"], leaves["y_fake"], leaves["x_g"], 1.2),
                                adversarial_generator_loss(leaves["logits"], sid_weight_factor(leaves["x_g"], leaves["y_real"]),
                                                           leaves["x_g"].shape), 100.0, 0.01, total, True)
    assert torch.isnan(plain)


@pytest.mark.parametrize("where", ["denoised", "x", "logits_fake", "logits_real"])
def test_planted_nan_sample_leaves_the_others_fake_score_gradient_unchanged(where):
    from sida.train.losses import sid_critic_terms

    B, total = 4, 8   # e.g. this micro-batch is one of two accumulation rounds
    shapes = dict(denoised=[B, 1, 2, 2], x=[B, 1, 2, 2], logits_fake=[B, 1, 1, 2], logits_real=[B, 1, 1, 2])
    sigma = t([0.5, 1.0, 2.0, 0.1], [B, 1, 1, 1])
    leaves = _leaves(1, **shapes)
    with torch.no_grad():
        leaves[where][2].view(-1)[0] = float("nan")   # sample 2
    l_fake, l_d, keep = sid_critic_terms(leaves["denoised"], leaves["x"], sigma, leaves["logits_fake"],
                                          leaves["logits_real"])
    assert keep.tolist() == [True, True, False, True]
    loss = sid_critic_objective(l_fake, l_d, total)
    assert torch.isfinite(loss)
    got = _grads(loss, leaves)

    ref_leaves = _leaves(1, **shapes)
    k = [0, 1, 3]
    den, x, lf, lr = (ref_leaves[n][k] for n in ("denoised", "x", "logits_fake", "logits_real"))
    ref_loss = sid_critic_objective(edm_denoising_loss(den, x, sigma[k]),
                                    discriminator_loss(lr, lf, edm_loss_weight(sigma[k])), total)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref = _grads(ref_loss, ref_leaves)
    for n in got:
        torch.testing.assert_close(got[n][k], ref[n][k], rtol=1e-6, atol=1e-7, msg=n)
        assert torch.equal(got[n][2], torch.zeros_like(got[n][2])), n
    # without a discriminator only the denoising term is there
    l_fake2, l_d2, keep2 = sid_critic_terms(leaves["denoised"], leaves["x"], sigma)
    assert l_d2 is None and keep2.tolist() == ([True, True, False, True] if where in ("denoised", "x") else [True] * 4)


def test_nothing_dropped_gives_the_plain_losses():
    from sida.train.losses import sid_critic_terms, sid_generator_terms

    g = torch.Generator().manual_seed(2)
    x, den, yr, yf = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(4))
    lf, lr = torch.randn(3, 1, 1, 2, generator=g), torch.randn(3, 1, 1, 2, generator=g)
    sigma = t([0.3, 1.0, 3.0], [3, 1, 1, 1])
    l_fake, l_d, keep = sid_critic_terms(den, x, sigma, lf, lr)
    assert keep.all()
    close(l_fake, edm_denoising_loss(den, x, sigma))
    close(l_d, discriminator_loss(lr, lf, edm_loss_weight(sigma)))
    l_sid, l_adv, keep = sid_generator_terms(yr, yf, x, 1.0, lf)
    close(l_sid, sid_generator_loss(yr, yf, x, 1.0))
    close(l_adv, adversarial_generator_loss(lf, sid_weight_factor(x, yr), x.shape))
