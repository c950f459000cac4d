"""Tests for sida.nets.precond and sida.nets.sampler against the EDM / SiD formulas."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sida.nets import precond as P
from sida.nets import sampler as S

from helpers import randomise_weights

TINY = dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=32,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], channel_mult_emb=4, dropout=0)


def _batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 8, 8, generator=g)
    sigma = torch.rand(B, generator=g) * 5 + 0.01
    labels = F.one_hot(torch.randint(0, 10, (B,), generator=g), 10).float()
    return x, sigma, labels


class _Recorder(torch.nn.Module):
    """Stands in for the UNet: records its inputs, returns a fixed function F(x) = 0.3 x + 0.1."""

    augment_dim = 0

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_flag="decoder"):
        self.x, self.noise = x, noise_labels
        out = 0.3 * x + 0.1
        logits = x.mean(dim=1, keepdim=True)
        return {"decoder": out, "encoder": logits, "encoder_decoder": (out, logits)}[return_flag]


def test_edm_coefficients_match_formulas():
    net = P.EDMPrecond(**TINY, sigma_data=0.5)
    net.model = _Recorder()
    x, sigma, labels = _batch()
    D = net(x, sigma, labels)
    s, sd = sigma.reshape(-1, 1, 1, 1).double(), 0.5
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (sd**2 + s**2).sqrt()
    torch.testing.assert_close(net.model.x.double(), c_in * x.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.model.noise.double(), sigma.double().log() / 4, rtol=1e-6, atol=1e-6)
    ref = c_skip * x.double() + c_out * (0.3 * c_in * x.double() + 0.1)
    torch.testing.assert_close(D.double(), ref, rtol=1e-5, atol=1e-5)
    # Logits come straight from the UNet (not preconditioned).
    logits = net(x, sigma, labels, return_flag="encoder")
    torch.testing.assert_close(logits, (c_in * x.double()).float().mean(1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_vp_ve_coefficients():
    x, sigma, labels = _batch()
    s = sigma.reshape(-1, 1, 1, 1)
    vp = P.VPPrecond(**TINY)
    vp.model = _Recorder()
    D = vp(x, sigma, labels)
    torch.testing.assert_close(vp.model.x, x / (s**2 + 1).sqrt())
    torch.testing.assert_close(vp.model.noise, (999 * vp.sigma_inv(s)).flatten())
    torch.testing.assert_close(D, x - s * (0.3 * x / (s**2 + 1).sqrt() + 0.1))
    torch.testing.assert_close(vp.sigma(vp.sigma_inv(s)), s, rtol=1e-4, atol=1e-4)
    ve = P.VEPrecond(**TINY)
    ve.model = _Recorder()
    D = ve(x, sigma, labels)
    torch.testing.assert_close(ve.model.noise, (0.5 * sigma).log())
    torch.testing.assert_close(D, x + s * (0.3 * x + 0.1))


@pytest.mark.parametrize("shape", ["scalar", "vector", "4d"])
def test_sigma_shapes(shape):
    net = P.EDMPrecond(**TINY).eval()
    x, _, labels = _batch()
    s = {"scalar": 1.5, "vector": torch.full([4], 1.5), "4d": torch.full([4, 1, 1, 1], 1.5)}[shape]
    ref = net(x, torch.full([4], 1.5), labels)
    torch.testing.assert_close(net(x, s, labels), ref)


def test_precond_flags_consistent_and_dtype():
    net = randomise_weights(P.EDMPrecond(**TINY)).eval()
    x, sigma, labels = _batch()
    with torch.no_grad():
        D = net(x, sigma, labels)
        logits = net(x, sigma, labels, return_flag="encoder")
        D2, logits2 = net(x, sigma, labels, return_flag="encoder_decoder")
    assert D.dtype == torch.float32 and logits.shape == (4, 1, 4, 4)
    assert torch.equal(D, D2) and torch.equal(logits, logits2)


def test_init_kwargs_rebuild_identical_network():
    torch.manual_seed(0)
    net = randomise_weights(P.EDMPrecond(**TINY, augment_dim=9)).eval()
    kwargs = json.loads(json.dumps(net.init_kwargs))  # JSON round trip
    assert kwargs["model_type"] == "SongUNet" and kwargs["augment_dim"] == 9
    net2 = P.PRECOND_CLASSES["EDMPrecond"](**kwargs).eval()
    net2.load_state_dict(net.state_dict(), strict=True)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in net2.state_dict().items()}
    x, sigma, labels = _batch()
    assert torch.equal(net(x, sigma, labels), net2(x, sigma, labels))
    assert set(P.PRECOND_CLASSES) == {"EDMPrecond", "VPPrecond", "VEPrecond", "EDM2Precond"}
    assert torch.equal(P.round_sigma(0.5), torch.as_tensor(0.5))


def test_missing_labels_default_to_zero_and_adm_builds():
    net = randomise_weights(P.EDMPrecond(**TINY)).eval()
    x, sigma, _ = _batch()
    torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros(4, 10)))
    adm = P.EDMPrecond(8, 1, label_dim=0, model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2],
                       num_blocks=1, attn_resolutions=[4], dropout=0)
    assert adm(x, sigma).shape == x.shape
    with pytest.raises(ValueError):
        P.EDMPrecond(8, 1, model_type="NoSuchNet")


def test_autocast_bf16_on_cpu():
    net = randomise_weights(P.EDMPrecond(**TINY)).eval()
    x, sigma, labels = _batch()
    with torch.no_grad():
        ref = net(x, sigma, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, logits = net(x, sigma, labels, return_flag="encoder_decoder")
    assert out.dtype == torch.float32 and logits.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_fp16_flag_is_fp32_on_cpu():
    net = P.EDMPrecond(**TINY, use_fp16=True).eval()
    x, sigma, labels = _batch()
    assert net(x, sigma, labels).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Sampler.

class _GaussianDenoiser:
    """Exact denoiser of N(mu, s^2 I): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, s):
        self.mu, self.s, self.calls = mu, s, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)


def test_heun_sampler_gaussian_analytic():
    mu, s = 0.3, 0.5
    D = _GaussianDenoiser(mu, s)
    latents = torch.randn(4096, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = S.heun_sampler(D, latents, num_steps=18)
    assert x0.dtype == torch.float32 and x0.shape == latents.shape
    assert D.calls == 35  # 2N - 1 NFE
    # The probability-flow ODE of a Gaussian is linear: x0 - mu = s / sqrt(s^2 + sigma_max^2) (x_T - mu),
    # x_T = sigma_max z, so the exact sample mean is mu (1 - s / 80.0016) and the std s * 80 / 80.0016.
    exact_std = s * 80 / math.hypot(s, 80)
    assert abs(x0.mean().item() - mu * (1 - s / math.hypot(s, 80))) < 0.01
    # 18 Heun steps on this narrow Gaussian (s = 0.5) over-disperse by ~5.5% (discretisation error,
    # it vanishes as below); the samples still match the target law to within 7%.
    assert abs(x0.std().item() / exact_std - 1) < 0.07

    # Second-order convergence to the exact linear flow: doubling the steps cuts the error ~4x.
    lat = latents[:256]
    exact = mu + s / math.hypot(s, 80) * (80 * lat - mu)
    e1 = (S.heun_sampler(_GaussianDenoiser(mu, s), lat, num_steps=64) - exact).abs().max().item()
    e2 = (S.heun_sampler(_GaussianDenoiser(mu, s), lat, num_steps=128) - exact).abs().max().item()
    assert e2 < 5e-3 and e1 / e2 > 3.0


def test_heun_sampler_with_network_runs():
    net = P.EDMPrecond(**TINY).eval()
    lat = torch.randn(2, 1, 8, 8)
    out = S.heun_sampler(net, lat, F.one_hot(torch.tensor([1, 2]), 10).float(), num_steps=3)
    assert out.shape == lat.shape and torch.isfinite(out).all()


def test_karras_sigmas_and_sid_sigma_t():
    t = S.karras_sigmas(18)
    assert t.shape == (19,) and t[-1] == 0
    torch.testing.assert_close(t[0], torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(t[17], torch.tensor(0.002, dtype=torch.float64))
    tt = torch.tensor([0.0, 0.5, 1.0])
    st = S.sid_sigma_t(tt)
    ref = (80 ** (1 / 7) + (1 - tt) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(st, ref)
    torch.testing.assert_close(st[[0, 2]], torch.tensor([0.002, 80.0]))
    assert torch.all(st[1:] > st[:-1])


def test_sample_sigma_lognormal():
    sig = S.sample_sigma_lognormal(200_000, generator=torch.Generator().manual_seed(0))
    assert sig.shape == (200_000, 1, 1, 1) and (sig > 0).all()
    assert abs(sig.log().mean().item() + 1.2) < 0.01 and abs(sig.log().std().item() - 1.2) < 0.01


def test_one_step_generate_convention():
    calls = {}

    class G(torch.nn.Module):
        augment_dim = 9

        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            calls.update(x=x, sigma=sigma, labels=class_labels, aug=augment_labels)
            return x

    z = torch.randn(3, 1, 8, 8)
    out = S.one_step_generate(G(), z, class_labels=None, sigma_init=2.5)
    torch.testing.assert_close(out, 2.5 * z)
    torch.testing.assert_close(calls["sigma"], torch.full([3], 2.5))
    assert torch.equal(calls["aug"], torch.zeros(3, 9))
    # With a real precond network: equals the direct denoiser call at sigma_init.
    net = randomise_weights(P.EDMPrecond(**TINY, augment_dim=9)).eval()
    labels = F.one_hot(torch.tensor([0, 1, 2]), 10).float()
    torch.testing.assert_close(S.one_step_generate(net, z, labels),
                               net(2.5 * z, torch.full([3], 2.5), labels, augment_labels=torch.zeros(3, 9)))
