"""Discriminator heads of the DMD2 and ADD baselines (`sida.nets.heads`) and the networks'
'encoder_features' return option they read."""

from __future__ import annotations

import math

import pytest
import torch

from sida.nets.heads import (ADDHeads, DMD2Head, FeatureHead, TeacherFeatures, as_tokens, num_groups,
                             probe_features, seeded)
from sida.nets.networks import DhariwalUNet, SongUNet
from sida.nets.precond import EDMPrecond
from sida.train.baseline_losses import hinge_discriminator_loss, ns_discriminator_loss, r1_penalty

DIGITS = dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[],
              dropout=0.0)  # the embedded 8x8 layout (ci-short sizes)
CIFAR = dict(model_channels=8, channel_mult=[2, 2, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[16],
             dropout=0.0)  # CIFAR-10's DDPM++ level layout at a tiny width


def _teacher(resolution: int, kwargs: dict, label_dim: int = 10, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    return EDMPrecond(resolution, 1 if resolution == 8 else 3, label_dim=label_dim, model_type="SongUNet",
                      **kwargs).eval()


def _labels(n: int, label_dim: int = 10, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(label_dim, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(idx, label_dim).float()


def _split_equal(fn, *batched) -> None:
    """fn on the batch == fn on its two halves concatenated (no cross-sample statistics)."""
    full = fn(*batched)
    b = batched[0].shape[0] // 2
    halves = torch.cat([fn(*(t[:b] for t in batched)), fn(*(t[b:] for t in batched))])
    assert torch.allclose(full, halves, rtol=1e-5, atol=1e-6), (full - halves).abs().max()


# -- encoder_features ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,res,kwargs,shapes", [
    (SongUNet, 8, DIGITS, [(16, 8), (32, 4)]),
    (SongUNet, 32, CIFAR, [(16, 32), (16, 16), (16, 8)]),
    (DhariwalUNet, 8, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0),
     [(16, 8), (32, 4)]),
])
def test_encoder_features_per_level_and_bottleneck(cls, res, kwargs, shapes):
    torch.manual_seed(0)
    net = cls(res, 3, 3, label_dim=4, **kwargs).eval()
    x, noise, labels = torch.randn(3, 3, res, res), torch.randn(3), _labels(3, 4)
    feats = net(x, noise, labels, return_flag="encoder_features")
    assert [tuple(f.shape) for f in feats] == [(3, c, r, r) for c, r in shapes]
    # the last level is the bottleneck: its channel mean is the SiDA discriminator's logit map
    logits = net(x, noise, labels, return_flag="encoder")
    assert torch.equal(feats[-1].mean(dim=1, keepdim=True), logits)
    # and asking for features changes nothing else
    out, logits2 = net(x, noise, labels, return_flag="encoder_decoder")
    assert torch.equal(out, net(x, noise, labels)) and torch.equal(logits2, logits)


def test_encoder_features_through_the_preconditioner():
    net = _teacher(8, DIGITS)
    x = torch.randn(2, 1, 8, 8)
    feats = net(x, torch.tensor([0.5, 2.0]), _labels(2), return_flag="encoder_features")
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4)]
    assert all(f.dtype == torch.float32 for f in feats)
    assert torch.equal(feats[-1].mean(dim=1, keepdim=True),
                       net(x, torch.tensor([0.5, 2.0]), _labels(2), return_flag="encoder"))


# -- DMD2's head -----------------------------------------------------------------------------------

def test_dmd2_head_at_imagenet_scale_has_dmd2s_layout():
    head = DMD2Head(768, 8)
    shapes = [tuple(p.shape) for p in head.parameters()]
    assert shapes == [(768, 768, 4, 4), (768,), (768,), (768,), (768, 768, 4, 4), (768,), (768,), (768,),
                      (1, 768, 1, 1), (1,)]
    assert head.net[1].num_groups == 32 and head.net[4].num_groups == 32
    assert (head.net[0].stride, head.net[0].padding) == ((2, 2), (1, 1))
    assert (head.net[3].kernel_size, head.net[3].stride, head.net[3].padding) == ((4, 4), (4, 4), (0, 0))
    assert head(torch.randn(2, 768, 8, 8)).shape == (2, 1)


@pytest.mark.parametrize("res,kwargs,bottleneck", [(8, DIGITS, (32, 4)), (32, CIFAR, (16, 8))])
def test_dmd2_head_on_the_fake_scores_bottleneck(res, kwargs, bottleneck):
    fake = _teacher(res, kwargs)
    c, r = bottleneck
    head = DMD2Head(c, r)
    x = torch.randn(4, fake.img_channels, res, res)
    rep = fake(x, torch.full([4], 1.5), _labels(4), return_flag="encoder_features")[-1]
    assert rep.shape == (4, c, r, r)
    assert head(rep).shape == (4, 1)
    head.train()
    _split_equal(head, rep)
    with pytest.raises(ValueError):
        head(torch.randn(4, c, 2 * r, 2 * r))


def test_dmd2_head_sizes_and_bad_resolution():
    assert DMD2Head(8, 2)(torch.randn(3, 8, 2, 2)).shape == (3, 1)
    assert DMD2Head(64, 16)(torch.randn(3, 64, 16, 16)).shape == (3, 1)
    with pytest.raises(ValueError):
        DMD2Head(8, 1)
    with pytest.raises(ValueError):
        DMD2Head(8, 5)
    assert [num_groups(c) for c in (768, 256, 64, 32, 8, 6, 3)] == [32, 32, 16, 8, 2, 1, 1]


# -- ADD's heads -----------------------------------------------------------------------------------

def test_as_tokens():
    m = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(as_tokens(m), m.reshape(1, 2, 12))
    tok = torch.arange(12.0).reshape(1, 6, 2)  # [B, N, C]
    assert torch.equal(as_tokens(tok), tok.transpose(1, 2))
    with pytest.raises(ValueError):
        as_tokens(torch.zeros(2, 3))


class TinyTokenNet(torch.nn.Module):
    """A random ViT-like stand-in: 2x2 patches -> tokens [B, N, C], two token MLP layers; returns
    the tokens after the patch embedding and after each layer (3 levels)."""

    def __init__(self, channels: int = 3, width: int = 24) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(channels, width, kernel_size=2, stride=2)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor, labels=None) -> list[torch.Tensor]:
        h = self.patch(x).flatten(2).transpose(1, 2)
        out = [h]
        for layer in self.layers:
            h = h + torch.nn.functional.gelu(layer(h))
            out.append(h)
        return out


@pytest.mark.parametrize("res", [8, 32])
def test_add_heads_on_teacher_features_and_on_a_token_stand_in(res):
    teacher = _teacher(res, DIGITS if res == 8 else CIFAR)
    image = (teacher.img_channels, res, res)
    x, labels = torch.randn(4, *image), _labels(4)
    for net in (TeacherFeatures(teacher, sigma=0.5), TinyTokenNet(image[0])):
        channels, tokens = probe_features(net, image, label_dim=10)
        if isinstance(net, TeacherFeatures):
            levels = [(16, 8), (32, 4)] if res == 8 else [(16, 32), (16, 16), (16, 8)]
            assert channels == [c for c, _ in levels] and tokens == [r * r for _, r in levels]
        else:
            assert channels == [24] * 3 and tokens == [(res // 2) ** 2] * 3
        heads = ADDHeads(channels, tokens, label_dim=10).train()
        feats = net(x, labels)
        logits = heads(feats, labels)
        assert logits.shape == (4, sum(tokens))
        _split_equal(lambda *a: heads(net(a[0], a[1]), a[1]), x, labels)


def test_projection_conditioning_acts_only_through_the_label():
    torch.manual_seed(0)
    head = FeatureHead(channels=8, tokens=16, label_dim=3, cmap_dim=5)
    x = torch.randn(2, 8, 16)
    c1, c2 = torch.eye(3)[[0, 0]], torch.eye(3)[[2, 2]]
    l1, l2 = head(x, c1), head(x, c2)
    assert l1.shape == (2, 16)
    assert not torch.allclose(l1, l2)  # the label changes the logits ...
    # ... only through the projection: logit_n = <cls(body(x))_n, W c + b> / sqrt(5)
    out = head.cls(head.body(x))
    cmap = c1 @ head.cmapper.weight.T + head.cmapper.bias
    assert torch.allclose(l1, (out * cmap[:, :, None]).sum(1) / math.sqrt(5), atol=1e-6)
    # the logit is affine in the label vector (the body never sees it)
    assert torch.allclose(head(x, (c1 + c2) / 2), (l1 + l2) / 2, atol=1e-6)
    # the same label gives the same logits whatever the other samples' labels are
    mixed = torch.stack([c1[0], c2[0]])
    assert torch.allclose(head(x, mixed)[0], l1[0], atol=1e-6) and torch.allclose(head(x, mixed)[1], l2[1], atol=1e-6)
    with pytest.raises(ValueError):
        head(x, None)
    # an unconditional head has one output channel and ignores labels
    plain = FeatureHead(channels=8, tokens=16)
    assert plain.cmapper is None and plain.cls.out_channels == 1
    assert torch.equal(plain(x), plain(x, c1))


def test_short_token_sequences_get_a_shorter_kernel():
    assert FeatureHead(8, 1).block_res[0].kernel_size == (1,)
    assert FeatureHead(8, 4).block_res[0].kernel_size == (3,)
    assert FeatureHead(8, 16).block_res[0].kernel_size == (9,)
    assert FeatureHead(8, 4)(torch.randn(2, 8, 4)).shape == (2, 4)


def test_r1_of_a_linear_head_on_a_feature_map_is_tokens_times_w_squared():
    torch.manual_seed(0)
    linear = torch.nn.Conv1d(6, 1, kernel_size=1)  # logit_n = w . f_n + b
    fmap = torch.randn(3, 6, 4, 5).requires_grad_(True)  # N = 20 tokens
    r1 = r1_penalty(linear(as_tokens(fmap))[:, 0], [fmap])
    w2 = float(linear.weight.detach().square().sum())
    assert torch.allclose(r1, torch.full((3,), 20 * w2), rtol=1e-5)


def _separates(make_head, loss_fn, shape, steps: int, lr: float = 3e-3) -> float:
    """Train a head for a few Adam steps to tell N(+m u, 1) from N(-m u, 1) (u a fixed random
    direction over channels); return its accuracy on fresh samples."""
    torch.manual_seed(0)
    head = make_head().train()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=g)
    u = u / u.norm() * math.sqrt(shape[0])

    def draw(n):
        return (torch.randn(n, *shape, generator=g) + 0.5 * u, torch.randn(n, *shape, generator=g) - 0.5 * u)

    for _ in range(steps):
        real, fake = draw(16)
        opt.zero_grad()
        loss_fn(head(real), head(fake)).mean().backward()
        opt.step()
    with torch.no_grad():
        real, fake = draw(256)
        s_real, s_fake = head(real).flatten(1).mean(1), head(fake).flatten(1).mean(1)
    return float(((s_real > 0).float().mean() + (s_fake < 0).float().mean()) / 2)


def test_heads_train_to_separate_two_gaussians():
    dmd2 = (lambda: DMD2Head(8, 4), ns_discriminator_loss, (8, 4, 4))

    class OneLevel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = ADDHeads([8], [16])

        def forward(self, f):
            return self.heads([f])

    add = (OneLevel, hinge_discriminator_loss, (8, 4, 4))
    for make, loss, shape in (dmd2, add):
        untrained, trained = _separates(make, loss, shape, steps=0), _separates(make, loss, shape, steps=25)
        assert untrained < 0.8 and trained > 0.95, (make, untrained, trained)


def test_teacher_features_stay_frozen_but_pass_gradients_to_the_input():
    teacher = _teacher(8, DIGITS)
    feats_net = TeacherFeatures(teacher, sigma=0.5, levels=[1])
    feats_net.train()
    assert not teacher.training
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    feats = feats_net(x, _labels(2))
    assert len(feats) == 1 and feats[0].shape == (2, 32, 4, 4)
    feats[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the fixed noise level is the network's conditioning: the same input gives the same features
    assert torch.equal(feats_net(x, _labels(2))[0], feats[0])
    # use_labels=False runs the teacher unconditioned (zero label row)
    unc = TeacherFeatures(teacher, sigma=0.5, use_labels=False)
    assert torch.equal(unc(x, _labels(2))[-1], unc(x, torch.zeros(2, 10))[-1])


def test_seeded_build_is_reproducible_and_leaves_the_global_stream_alone():
    state = torch.get_rng_state()
    a = seeded(lambda: DMD2Head(8, 4), seed=5)
    b = seeded(lambda: DMD2Head(8, 4), seed=5)
    c = seeded(lambda: DMD2Head(8, 4), seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
