"""EDM2's magnitude-preserving UNet: layer formulas by hand, the published layout and parameter
counts of all six ImageNet-512 sizes, the encoder/decoder option, forced weight normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sida.nets.edm2 import (EDM2_IMG512_CHANNELS, MPConv, MPFourier, edm2_img512_kwargs,
                            force_weight_norm_, mp_cat, mp_silu, mp_sum, normalize, resample)
from sida.nets.precond import PRECOND_CLASSES, EDM2Precond

TINY = dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=False, model_channels=16,
            channel_mult=[1, 2, 3], num_blocks=1, attn_resolutions=[8, 4], channels_per_head=16, dropout=0.0)


def tiny_edm2(seed: int = 0, **overrides) -> EDM2Precond:
    """A tiny EDM2Precond whose zero-initialised gains are randomised (so outputs depend on everything)."""
    torch.manual_seed(seed)
    net = EDM2Precond(**{**TINY, **overrides})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:  # out_gain, emb_gain start at 0
                p.fill_(0.5 + 0.1 * torch.randn(()).item())
    return net.eval()


def _inputs(b: int = 3, res: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, res, res, generator=g)
    sigma = torch.tensor([0.05, 1.0, 30.0, 2.5, 0.5][:b])
    labels = F.one_hot(torch.arange(b) % 10, 10).float()
    return x, sigma, labels


# -- layer formulas by hand ---------------------------------------------------------------------

def test_normalize_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    # Row norms 5 and 2 over n = 2 elements: x / (1e-4 + ||x|| / sqrt(2)).
    want = torch.stack([x[0] / (1e-4 + 5 / math.sqrt(2)), x[1] / (1e-4 + 2 / math.sqrt(2))])
    torch.testing.assert_close(normalize(x), want)
    # Pixel norm: over channels only.
    y = torch.tensor([[[[3.0]], [[4.0]]]])  # [1, 2, 1, 1]
    torch.testing.assert_close(normalize(y, dim=1), y / (1e-4 + 5 / math.sqrt(2)))
    # RMS 1 afterwards (up to eps).
    r = normalize(torch.randn(7, 30))
    torch.testing.assert_close(r.pow(2).mean(1), torch.ones(7), atol=1e-3, rtol=0)


def test_mp_silu_sum_cat_by_hand():
    x = torch.tensor([-2.0, 0.0, 1.0])
    torch.testing.assert_close(mp_silu(x), x * torch.sigmoid(x) / 0.596)
    a, b = torch.tensor([1.0]), torch.tensor([0.0])
    torch.testing.assert_close(mp_sum(a, b, 0.3), torch.tensor([0.7 / math.sqrt(0.49 + 0.09)]))
    torch.testing.assert_close(mp_sum(a, torch.tensor([3.0]), 0.5), torch.tensor([2 / math.sqrt(0.5)]))
    # mp_cat, N_a = 1, N_b = 3, t = 0.5: C = sqrt(4 / 0.5), w_a = C * 0.5 / 1, w_b = C * 0.5 / sqrt(3).
    a, b = torch.ones(1, 1), torch.ones(1, 3)
    c = math.sqrt(4 / 0.5)
    torch.testing.assert_close(mp_cat(a, b, t=0.5), torch.tensor([[c * 0.5] + [c * 0.5 / math.sqrt(3)] * 3]))
    # Unit-magnitude inputs give a unit-magnitude concatenation for any t.
    a, b = torch.randn(2000, 5), torch.randn(2000, 11)
    for t in (0.2, 0.5, 0.8):
        assert abs(mp_cat(a, b, t=t).pow(2).mean().item() - 1) < 0.05


def test_fourier_by_hand():
    torch.manual_seed(0)
    f = MPFourier(3)
    assert set(dict(f.named_buffers())) == {"freqs", "phases"} and not list(f.parameters())
    with torch.no_grad():
        f.freqs.copy_(torch.tensor([1.0, 2.0, -0.5]))
        f.phases.copy_(torch.tensor([0.0, 0.25, 3.0]))
    x = torch.tensor([0.5, -1.0])
    want = torch.tensor([[math.sqrt(2) * math.cos(0.5 * fr + p) for fr, p in ((1, 0), (2, 0.25), (-0.5, 3))],
                         [math.sqrt(2) * math.cos(-1.0 * fr + p) for fr, p in ((1, 0), (2, 0.25), (-0.5, 3))]])
    torch.testing.assert_close(f(x), want)


def test_mpconv_by_hand():
    lin = MPConv(2, 1, kernel=[])
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    # normalize(w) = w / (eps + 5 / sqrt(2)); scaled by gain / sqrt(fan_in = 2).
    w = torch.tensor([3.0, 4.0]) / (1e-4 + 5 / math.sqrt(2)) / math.sqrt(2)
    x = torch.tensor([[1.0, -2.0]])
    torch.testing.assert_close(lin(x), (x @ w)[:, None])
    torch.testing.assert_close(lin(x, gain=3.0), 3 * (x @ w)[:, None])
    # The stored scale does not matter; a 3x3 conv keeps unit magnitude on unit-magnitude input.
    conv = MPConv(16, 32, kernel=[3, 3])
    scaled = MPConv(16, 32, kernel=[3, 3])
    with torch.no_grad():
        scaled.weight.copy_(conv.weight * 7.5)
    x = torch.randn(4, 16, 12, 12)
    torch.testing.assert_close(scaled(x), conv(x), rtol=1e-4, atol=1e-5)
    assert abs(conv(x)[:, :, 1:-1, 1:-1].pow(2).mean().item() - 1) < 0.15


def test_resample_box_filter():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = resample(x, "down")
    torch.testing.assert_close(down, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))  # 2x2 means
    up = resample(down, "up")
    torch.testing.assert_close(up, down.repeat_interleave(2, 2).repeat_interleave(2, 3))  # nearest copy
    assert resample(x, "keep") is x


# -- the published layout -------------------------------------------------------------------------

# Parameter counts of the edm2-img512-{size} networks with their uncertainty head. XS is the
# published network's count as stated in issue 11 (124,713,253), an independent check of the layout;
# the other five are this layout's counts at the published widths (regression values).
PARAMS = {"xs": 124_713_253, "s": 280_212_837, "m": 497_807_781, "l": 777_498_085, "xl": 1_119_283_749,
          "xxl": 1_523_164_773}


@pytest.mark.parametrize("size", list(EDM2_IMG512_CHANNELS))
def test_parameter_counts_on_meta_device(size):
    with torch.device("meta"):
        net = EDM2Precond(**edm2_img512_kwargs(size))
        bare = EDM2Precond(**edm2_img512_kwargs(size, logvar=False))
    n = sum(p.numel() for p in net.parameters())
    assert n == PARAMS[size]
    # The head: logvar_linear [1, 128] (the Fourier features are buffers).
    assert n - sum(p.numel() for p in bare.parameters()) == 128


# State-dict entries of XS: 76 in the encoder, 118 in the decoder, 9 elsewhere (gain, embeddings, head).
XS_ENTRIES = 203


def test_xs_names_and_shapes():
    with torch.device("meta"):
        net = EDM2Precond(**edm2_img512_kwargs("xs"))
    sd = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expect = {
        "unet.out_gain": (), "unet.emb_fourier.freqs": (128,), "unet.emb_fourier.phases": (128,),
        "unet.emb_noise.weight": (512, 128), "unet.emb_label.weight": (512, 1000),
        "unet.enc.64x64_conv.weight": (128, 5, 3, 3),
        "unet.enc.64x64_block0.emb_gain": (), "unet.enc.64x64_block0.conv_res0.weight": (128, 128, 3, 3),
        "unet.enc.64x64_block0.emb_linear.weight": (128, 512),
        "unet.enc.32x32_down.conv_res1.weight": (128, 128, 3, 3),
        "unet.enc.32x32_block0.conv_skip.weight": (256, 128, 1, 1),
        "unet.enc.16x16_block0.attn_qkv.weight": (1152, 384, 1, 1),
        "unet.enc.8x8_block2.attn_proj.weight": (512, 512, 1, 1),
        "unet.dec.8x8_in0.attn_qkv.weight": (1536, 512, 1, 1),
        "unet.dec.8x8_block0.conv_res0.weight": (512, 1024, 3, 3),
        "unet.dec.8x8_block0.conv_skip.weight": (512, 1024, 1, 1),
        "unet.dec.16x16_up.conv_res0.weight": (512, 512, 3, 3),
        "unet.dec.64x64_block3.conv_skip.weight": (128, 256, 1, 1),
        "unet.out_conv.weight": (4, 128, 3, 3),
        "logvar_fourier.freqs": (128,), "logvar_fourier.phases": (128,), "logvar_linear.weight": (1, 128),
    }
    for k, shape in expect.items():
        assert sd.get(k) == shape, k
    # No attention at 64 / 32, none in 8x8_in1; no biases anywhere.
    assert not any("attn" in k for k in sd if "64x64" in k or "32x32" in k or "in1" in k)
    assert not any(k.endswith("bias") for k in sd)
    assert len(sd) == XS_ENTRIES
    assert sum(k.startswith("unet.enc.") for k in sd) == 76 and sum(k.startswith("unet.dec.") for k in sd) == 118
    assert [k for k in net.unet.enc] == ["64x64_conv", "64x64_block0", "64x64_block1", "64x64_block2",
                                          "32x32_down", "32x32_block0", "32x32_block1", "32x32_block2",
                                          "16x16_down", "16x16_block0", "16x16_block1", "16x16_block2",
                                          "8x8_down", "8x8_block0", "8x8_block1", "8x8_block2"]
    assert list(net.unet.dec)[:6] == ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "8x8_block2", "8x8_block3"]
    assert PRECOND_CLASSES["EDM2Precond"] is EDM2Precond


def test_meta_forward_shapes_xs():
    with torch.device("meta"):
        net = EDM2Precond(**edm2_img512_kwargs("xs"))
        x = torch.empty(2, 4, 64, 64)
        sigma = torch.empty(2)
        labels = torch.empty(2, 1000)
        d, logits, logvar = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    assert d.shape == (2, 4, 64, 64) and logits.shape == (2, 1, 8, 8) and logvar.shape == (2, 1, 1, 1)


# -- behaviour -----------------------------------------------------------------------------------

def test_encoder_decoder_equals_separate_passes():
    net = tiny_edm2()
    x, sigma, labels = _inputs()
    with torch.no_grad():
        d = net(x, sigma, labels)
        logits = net(x, sigma, labels, return_flag="encoder")
        d2, logits2 = net(x, sigma, labels, return_flag="encoder_decoder")
        d3, logits3 = net(x, sigma, labels, return_flag="encoder_decoder", decode_first=2)
        d4, logits4, lv = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    assert logits.shape == (3, 1, 4, 4)  # 16 -> 8 -> 4: the last encoder stage
    torch.testing.assert_close(d2, d, rtol=0, atol=0)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    torch.testing.assert_close(d3, d[:2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits3, logits, rtol=0, atol=0)
    torch.testing.assert_close(d4, d, rtol=0, atol=0)
    torch.testing.assert_close(lv, net.logvar(sigma))


def test_precond_coefficients_and_logvar():
    net = tiny_edm2()
    x, sigma, labels = _inputs()
    with torch.no_grad():
        d, lv = net(x, sigma, labels, return_logvar=True)
        f = net.unet(x / (0.25 + sigma[:, None, None, None] ** 2).sqrt(), sigma.log() / 4, labels)
    s = sigma[:, None, None, None]
    want = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * f
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-5)
    # logvar: a function of sigma only, u(sigma) = logvar_linear(logvar_fourier(ln(sigma)/4)).
    with torch.no_grad():
        u = net.logvar_linear(net.logvar_fourier(sigma.log() / 4))
        other = net(torch.randn_like(x), sigma, torch.zeros_like(labels), return_logvar=True)[1]
    torch.testing.assert_close(lv.flatten(), u.flatten())
    torch.testing.assert_close(other, lv)
    with pytest.raises(ValueError, match="logvar=False"):
        tiny_edm2(logvar=False).logvar(sigma)


def test_rebuild_from_init_kwargs():
    net = tiny_edm2()
    other = PRECOND_CLASSES["EDM2Precond"](**net.init_kwargs)
    other.load_state_dict(net.state_dict(), strict=True)
    x, sigma, labels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(other(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)


# -- forced weight normalisation --------------------------------------------------------------------

def test_forced_weight_norm_changes_a_layer_only_through_eps():
    """normalize(normalize(w)) = w / (r + eps r + eps^2) vs normalize(w) = w / (r + eps), with
    r = ||w|| / sqrt(fan_in) per output channel: the ratio by hand."""
    lin = MPConv(4, 2, kernel=[])
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))  # r = 1 and r = 1
        lin.weight[0].mul_(3.0)  # r = 3 for the first output channel
    x = torch.randn(5, 4)
    before = lin(x)
    force_weight_norm_(lin)
    after = lin(x)
    eps = 1e-4
    for ch, r in ((0, 3.0), (1, 1.0)):
        ratio = (r + eps) / (r + eps * r + eps ** 2)
        torch.testing.assert_close(after[:, ch], before[:, ch] * ratio, rtol=1e-6, atol=1e-7)
    assert abs((3 + eps) / (3 + 3 * eps + eps ** 2) - 1) > 5e-5  # the test would see a wrong formula


def test_forced_weight_norm_leaves_the_function_unchanged():
    net = tiny_edm2()
    force_weight_norm_(net)  # at the start of a run
    with torch.no_grad():  # an optimiser step's drift away from unit magnitude
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.mul_(1 + 0.02 * torch.randn_like(m.weight))
    x, sigma, labels = _inputs()
    with torch.no_grad():
        before = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    n = force_weight_norm_(net)  # after the step
    assert n == sum(isinstance(m, MPConv) for m in net.modules()) > 10
    for m in net.modules():  # the stored weights now have unit magnitude per output channel
        if isinstance(m, MPConv):
            rms = m.weight.flatten(1).pow(2).mean(1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=2e-4, rtol=0)
    with torch.no_grad():
        after = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    for a, b in zip(before, after):
        # eps |1 - r| / r ~ 1e-4 * 0.02 per layer: far below fp32 noise of the whole network.
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    # Applying it twice changes nothing further at fp32 resolution.
    w = net.unet.out_conv.weight.detach().clone()
    force_weight_norm_(net)
    torch.testing.assert_close(net.unet.out_conv.weight, w, rtol=1e-6, atol=0)


class _InForwardMPConv(torch.nn.Module):
    """The in-forward reference (eq. 66 as the authors apply it): in training mode the fp32
    weight is overwritten with normalize(w) first, then normalised again for use."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, x):
        w = self.weight  # fp32: the same storage, so the overwrite is visible below
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) / math.sqrt(w[0].numel())
        return F.conv2d(x, w, padding=1)


def test_post_step_normalisation_matches_in_forward_normalisation():
    """Normalising after every optimiser step (and once at the start) yields the same weights
    and outputs as normalising inside every training forward, step after step."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 3, 3, 3) * 2.0
    ref = _InForwardMPConv(w0).train()
    ours = MPConv(3, 6, kernel=[3, 3]).train()
    with torch.no_grad():
        ours.weight.copy_(w0)
    force_weight_norm_(ours)  # at the start of the run
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.05, betas=(0.0, 0.999))
    opt_ours = torch.optim.Adam(ours.parameters(), lr=0.05, betas=(0.0, 0.999))
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(2, 3, 5, 5, generator=g)
        target = torch.randn(2, 6, 5, 5, generator=g)
        out_ref, out_ours = ref(x), ours(x)
        torch.testing.assert_close(out_ours, out_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-7)
        for out, opt in ((out_ref, opt_ref), (out_ours, opt_ours)):
            opt.zero_grad()
            (out - target).pow(2).sum().backward()
            opt.step()
        force_weight_norm_(ours)  # after every optimiser step


def test_two_training_forwards_then_backward_work():
    """SiDA's fake score: two training-mode forwards before one backward (the authors' in-forward
    normalisation fails here with an in-place modification error)."""
    net = tiny_edm2().train()
    x, sigma, labels = _inputs()
    d, logits = net(x, sigma, labels, return_flag="encoder_decoder")
    logits_real = net(x + 1, sigma, labels, return_flag="encoder")
    (d.pow(2).mean() + logits.mean() + logits_real.mean()).backward()
    assert all(p.grad is not None for p in net.unet.parameters() if p.requires_grad)
