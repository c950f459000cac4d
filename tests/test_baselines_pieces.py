"""The per-update pieces of the DMD2 / ADD baselines (`sida.train.methods.dmd`, `.add`, and the
loop's `sida.train.updates`) on small real networks:
optimiser kinds, warm-up, the critic/generator turn, head logits, R1 on the heads' inputs, and
the property the loop relies on: a batch split into accumulation rounds gives the same gradient."""

from __future__ import annotations

import pytest
import torch

from sida.nets.heads import ADDHeads, DMD2Head, TeacherFeatures, probe_features, seeded
from sida.nets.precond import EDMPrecond
from sida.nets.sampler import add_student_sigmas
from sida.train.methods.add import add_logits, add_real_logits_with_r1, add_student_sigma, real_features
from sida.train.methods.dmd import dmd2_head_logits, dmd_denoising_term
from sida.train.updates import generator_turn, make_optimizer, warmup_lr
from sida.train.baseline_losses import (add_discriminator_objective, dmd2_critic_objective, hinge_discriminator_loss,
                               ns_discriminator_loss, r1_penalty)

NET = dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[], dropout=0.0)


def _net(seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    return EDMPrecond(8, 1, label_dim=10, model_type="SongUNet", **NET)


def _labels(n: int) -> torch.Tensor:
    return torch.eye(10)[torch.arange(n) % 10]


def test_make_optimizer_kinds():
    p = [torch.nn.Parameter(torch.zeros(3))]
    adam = make_optimizer(p, "adam", lr=1e-4)
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["betas"] == (0.0, 0.999) and adam.defaults["weight_decay"] == 0.0
    adamw = make_optimizer(p, "adamw", lr=2e-6, betas=[0.9, 0.999], weight_decay=0.01)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["betas"] == (0.9, 0.999) and adamw.defaults["weight_decay"] == 0.01
    assert adamw.defaults["lr"] == 2e-6 and adamw.defaults["eps"] == 1e-8
    # fused (the faster step, docs/performance.md) unless asked otherwise
    assert adam.defaults["fused"] and adamw.defaults["fused"]
    assert not make_optimizer(p, "adam", lr=1e-4, fused=False).defaults["fused"]
    with pytest.raises(ValueError):
        make_optimizer(p, "sgd", lr=1.0)


def test_warmup_lr_and_generator_turn():
    assert warmup_lr(2e-6, 0, 20) == 0.0
    assert warmup_lr(2e-6, 5000, 20) == pytest.approx(0.5e-6)
    assert warmup_lr(2e-6, 20000, 20) == 2e-6 and warmup_lr(2e-6, 10 ** 7, 20) == 2e-6
    assert warmup_lr(1e-4, 0, 0) == 1e-4  # no warm-up
    # critic ratio 5 at batch 280: iterations 0, 5, 10 update the generator
    turns = [generator_turn(i * 280, 280, 5) for i in range(11)]
    assert turns == [True, False, False, False, False, True, False, False, False, False, True]
    assert all(generator_turn(i * 64, 64, 1) for i in range(4))


def test_add_student_sigma_lookup():
    sig = add_student_sigmas()
    out = add_student_sigma(torch.tensor([0, 3, 1, 1]), sig)
    assert out.shape == (4, 1, 1, 1)
    assert out.flatten().tolist() == pytest.approx([sig[0], sig[3], sig[1], sig[1]])


def test_dmd2_head_logits_reach_the_generator_through_the_frozen_fake_score():
    fake = _net().requires_grad_(False)
    head = seeded(lambda: DMD2Head(32, 4), seed=1).requires_grad_(False)
    x_g = torch.randn(3, 1, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.1, 1.0, 10.0]).reshape(-1, 1, 1, 1)
    eps = torch.randn(3, 1, 8, 8)
    logits = dmd2_head_logits(fake, head, x_g, sigma, eps, _labels(3))
    assert logits.shape == (3, 1)
    # the same as running the pieces by hand
    rep = fake(x_g + sigma * eps, sigma.flatten(), _labels(3), return_flag="encoder_features")[-1]
    assert torch.equal(logits, head(rep))
    logits.sum().backward()
    assert x_g.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(fake.parameters()) + list(head.parameters()))


def test_add_r1_is_on_head_inputs_and_trains_only_the_heads():
    teacher = _net()
    features = TeacherFeatures(teacher, sigma=0.5)
    channels, tokens = probe_features(features, (1, 8, 8), label_dim=10)
    heads = seeded(lambda: ADDHeads(channels, tokens, label_dim=10), seed=2).train()
    x0 = torch.randn(4, 1, 8, 8)
    logits, r1 = add_real_logits_with_r1(heads, real_features(features, x0, _labels(4), False)[0], _labels(4))
    assert logits.shape == (4, sum(tokens)) and r1.shape == (4,)
    assert torch.allclose(logits, add_logits(features, heads, x0, _labels(4)), atol=1e-6)
    # by hand: gradient of the summed logits w.r.t. the detached feature maps
    feats = [f.detach().requires_grad_(True) for f in features(x0, _labels(4))]
    assert torch.allclose(r1, r1_penalty(heads(feats, _labels(4)), feats), rtol=1e-5)
    r1.sum().backward()
    assert all(p.grad is not None for p in heads.parameters() if p.requires_grad and p.ndim > 1)
    assert all(p.grad is None for p in teacher.parameters())


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def test_add_discriminator_gradient_does_not_depend_on_the_batch_split():
    teacher = _net()
    features = TeacherFeatures(teacher, sigma=0.5)
    channels, tokens = probe_features(features, (1, 8, 8), label_dim=10)
    heads = seeded(lambda: ADDHeads(channels, tokens, label_dim=10), seed=2).train()
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    labels = _labels(4)

    def accumulate(chunks):
        heads.zero_grad()
        for sl in chunks:
            feats, _ = real_features(features, real[sl], labels[sl], False)
            lr_, r1 = add_real_logits_with_r1(heads, feats, labels[sl])
            lf = add_logits(features, heads, fake[sl], labels[sl])
            add_discriminator_objective(hinge_discriminator_loss(lr_, lf), r1, batch_total=4, gamma=0.1).backward()
        return _grads(heads.parameters())

    whole = accumulate([slice(0, 4)])
    halves = accumulate([slice(0, 2), slice(2, 4)])
    for a, b in zip(whole, halves):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dmd2_critic_gradient_does_not_depend_on_the_batch_split():
    fake = _net().train()
    head = seeded(lambda: DMD2Head(32, 4), seed=1).train()
    params = list(fake.parameters()) + list(head.parameters())
    g = torch.Generator().manual_seed(0)
    x_g, real = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    sig = [torch.exp(torch.randn(4, 1, 1, 1, generator=g)) for _ in range(3)]
    eps = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(3)]
    labels = _labels(4)

    def accumulate(chunks):
        for p in params:
            p.grad = None
        for sl in chunks:
            l_fake = dmd_denoising_term(fake, x_g[sl], sig[0][sl], eps[0][sl], labels[sl])
            lr_ = dmd2_head_logits(fake, head, real[sl], sig[1][sl], eps[1][sl], labels[sl])
            lf = dmd2_head_logits(fake, head, x_g[sl], sig[2][sl], eps[2][sl], labels[sl])
            dmd2_critic_objective(l_fake, ns_discriminator_loss(lr_, lf), batch_total=4).backward()
        return _grads(params)

    whole = accumulate([slice(0, 4)])
    halves = accumulate([slice(0, 2), slice(2, 4)])
    for a, b in zip(whole, halves):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
